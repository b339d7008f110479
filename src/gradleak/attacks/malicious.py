"""Malicious-server attacks: the server changes the model it sends, the client trains on it.

**Imprint module** (Fowl, Geiping, Czaja, Goldblum, Goldstein, "Robbing the Fed: Directly
Obtaining Private Data in Federated Learning with Modified Models", ICLR 2022, arXiv
2110.13057). The server puts a linear layer with ``N`` units in front of the model: every
unit measures the same quantity of the input, ``m(x) = <w, x>`` (here the mean pixel,
i.e. brightness), with a bias ``-c_i`` at an increasing cut ``c_i``, then a ReLU. Unit ``i``
fires for the samples with ``m(x) > c_i``. The units' outputs are added back to the input
along one direction ``a`` (``x + a * sum_i h_i``), so every unit receives the same
back-propagated signal ``g_s = a^T dL/dx'_s`` from sample ``s``. Then for consecutive units

    dL/dW_i - dL/dW_{i+1} = (1/B) sum_{s in bin i} g_s x_s,
    dL/db_i - dL/db_{i+1} = (1/B) sum_{s in bin i} g_s,

where bin ``i`` holds the samples with ``c_i < m(x) <= c_{i+1}``: a sample alone in its bin
is their ratio, exactly, whatever the rest of the network and the batch size. The server
places the cuts at quantiles of ``m`` on public images, so that the B samples of a batch
spread over the bins; with N bins about ``B exp(-B/N)`` of them are alone in theirs.

Conditions: a malicious server (``ThreatModel(server="malicious")``) that may insert the
module; one FedSGD gradient (or a single local step of known learning rate); samples
alone in a bin come back exactly, samples sharing a bin come back as a weighted mix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AttackNotApplicable, ConfigError
from ..limits import check_int
from ..update import SharedUpdate
from .base import Attack, Reconstruction, register_attack

__all__ = ["ImprintedModel", "imprint_cuts", "imprint_inversion", "ImprintAttack", "MaliciousAttack", "TrapWeights", "ClassFishing",
           "distinct_rows"]


class ImprintedModel(nn.Module):
    """``model`` behind an imprint module: ``model(x + a * sum_i relu(<w, x> - c_i))``.

    Parameter names: ``imprint.weight`` (N, d), ``imprint.bias`` (N,), ``spread.weight``
    (d, N), and the original model's parameters under ``model.``."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], cuts: torch.Tensor, *,
                 spread: float = 1e-3, seed: int = 0):
        super().__init__()
        d = math.prod(input_shape)
        ref = next(model.parameters())
        self.input_shape = tuple(input_shape)
        self.imprint = nn.Linear(d, cuts.numel()).to(dtype=ref.dtype, device=ref.device)
        self.spread = nn.Linear(cuts.numel(), d, bias=False).to(dtype=ref.dtype, device=ref.device)
        direction = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
        with torch.no_grad():
            self.imprint.weight.copy_(torch.full((cuts.numel(), d), 1.0 / d, dtype=ref.dtype))   # m(x): mean pixel
            self.imprint.bias.copy_(-cuts.to(ref.dtype))
            column = spread * direction / torch.linalg.vector_norm(direction)
            self.spread.weight.copy_(column[:, None].expand(d, cuts.numel()).to(ref.device))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.imprint(x.flatten(1)))
        return self.model(x + self.spread(h).view_as(x))


def imprint_cuts(public: torch.Tensor | None, bins: int) -> torch.Tensor:
    """``bins`` increasing cuts at the quantiles ``k / (bins + 1)`` of a Gaussian fitted to
    the mean pixel of ``public`` images (normalized as the client normalizes; images the
    server has, not the client's), as Robbing the Fed places its bins; without public images,
    a standard normal. The client's samples then spread over the bins."""
    check_int("bins", bins, 2, 1_000_000)
    mu, sigma = 0.0, 1.0
    if public is not None:
        measurement = public.flatten(1).mean(1).double()
        if measurement.numel() < 2:
            raise ConfigError("imprint_cuts needs at least 2 public images to fit the bins' distribution")
        mu, sigma = float(measurement.mean()), float(measurement.std().clamp_min(1e-6))
    levels = torch.arange(1, bins + 1, dtype=torch.float64) / (bins + 1)
    return mu + sigma * torch.special.ndtri(levels)


def imprint_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor, *,
                      rtol: float = 1e-6) -> tuple[torch.Tensor, list[int]]:
    """The inputs alone in their bins, from the imprint layer's gradients: ``(images
    (K, d), bins)`` for the K bins whose bias-gradient difference is non-zero (above
    ``rtol`` of the largest), each ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})`` (the last bin
    alone: ``dW_N / db_N``)."""
    dW = torch.cat([weight_grad[:-1] - weight_grad[1:], weight_grad[-1:]])
    db = torch.cat([bias_grad[:-1] - bias_grad[1:], bias_grad[-1:]])
    if not bool((db != 0).any()):
        raise AttackNotApplicable("every imprint unit has a zero bias gradient: no sample reached a bin",
                                  condition="samples whose measurement falls in a bin")
    filled = torch.nonzero(db.abs() > rtol * db.abs().max()).reshape(-1)
    images = dW[filled] / db[filled, None]
    return images, filled.tolist()


class MaliciousAttack(Attack):
    """An attack by a server that changes the model: :meth:`serve` returns the model the
    clients receive (and train on); :meth:`reconstruct` reads their updates of it."""

    def serve(self, model: nn.Module, input_shape: tuple[int, ...], public: torch.Tensor | None) -> nn.Module:
        """The model the clients receive; ``public``: (normalized) images the server has, or None."""
        raise NotImplementedError

    def _require_malicious(self) -> None:
        if getattr(self.threat, "server", "honest") != "malicious":
            raise AttackNotApplicable(f"{self.name} changes the model the server sends: it needs "
                                      "ThreatModel(server='malicious')", condition="a malicious server")


@register_attack
class ImprintAttack(MaliciousAttack):
    """Robbing the Fed's imprint module (Fowl et al. 2022): exact recovery of every sample
    alone in its bin, from one FedSGD update, at any batch size. Options: ``bins`` (units of
    the imprint layer; default 128), ``spread`` (size of the direction the module writes
    back into the input; small keeps the model's function), ``seed``."""

    name = "imprint"
    paper = "Fowl et al. 2022, Robbing the Fed (ICLR; arXiv 2110.13057)"
    conditions = "malicious server inserting a module; a FedSGD gradient; samples alone in a bin come back exactly"
    surrogate_data = True      # public images place the server's weights: SoK threat model G

    def __init__(self, model, threat=None, *, bins: int = 128, spread: float = 1e-3, seed: int = 0):
        super().__init__(model, threat)
        self.bins = check_int("bins", bins, 2, 1_000_000)
        self.spread, self.seed = float(spread), seed

    def options(self):
        return {**super().options(), "bins": self.bins, "spread": self.spread, "seed": self.seed}

    def serve(self, model: nn.Module, input_shape: tuple[int, ...], public: torch.Tensor | None) -> nn.Module:
        """The model with the imprint module in front, bins placed on ``public`` (normalized) images."""
        self._require_malicious()
        served = ImprintedModel(model, input_shape, imprint_cuts(public, self.bins), spread=self.spread,
                                seed=self.seed)
        self.model = served
        return served

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        self._require_malicious()
        if "imprint.weight" not in update.tensors:
            raise AttackNotApplicable("the update has no imprint.weight: the client did not train the served model",
                                      condition="the client trained the model with the imprint module")
        gradient = update.as_gradient()
        x, bins = imprint_inversion(gradient["imprint.weight"].double(), gradient["imprint.bias"].double())
        spec = update.data_spec
        images = x.to(gradient["imprint.weight"].dtype).reshape(-1, *update.input_shape)
        if spec is not None:
            images = spec.denormalize(images)
        notes = [f"{len(bins)} of {self.bins} bins hold samples; each bin alone is one sample, exactly; bins "
                 "shared by several samples give their mix",
                 f"batch of {update.batch_size or 'unknown size'}"]
        return Reconstruction(images=images.detach(), history={"bins_filled": [float(len(bins))]}, notes=notes)


def _first_input_layer(model: nn.Module, input_shape: tuple[int, ...]):
    """The first ``nn.Linear`` with a bias that is fed the (flattened) model input."""
    from ._layers import trace_linear_layers

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    layer = next((t for t in trace_linear_layers(model, input_shape, params, buffers)
                  if t.has_bias and t.receives_model_input), None)
    if layer is None:
        raise AttackNotApplicable("no fully connected layer with bias is fed the model input",
                                  condition="a first fully connected layer with bias")
    return layer, dict(model.named_modules())[layer.name]


def distinct_rows(candidates: torch.Tensor, counts_from: torch.Tensor, rtol: float = 1e-4) -> list[tuple[int, int]]:
    """Group the rows of ``candidates`` that are the same vector (relative distance below
    ``rtol``): ``[(row, how many rows equal it)]``, the largest groups first."""
    norms = torch.linalg.vector_norm(candidates, dim=1).clamp_min(1e-30)
    groups: list[list[int]] = []
    for k in counts_from.tolist():
        for group in groups:
            if float(torch.linalg.vector_norm(candidates[k] - candidates[group[0]])) <= rtol * float(norms[k]):
                group.append(k)
                break
        else:
            groups.append([k])
    groups.sort(key=len, reverse=True)
    return [(group[0], len(group)) for group in groups]


@register_attack
class TrapWeights(MaliciousAttack):
    """Trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot, "When the
    Curious Abandon Honesty: Federated Learning Is Not Private", IEEE EuroS&P 2023, arXiv
    2112.02918): the server sets the first fully connected layer so that each unit fires for
    few inputs; a unit fired by one sample of the batch has ``row_j(dW) / db_j`` equal to that
    sample, exactly (the FC-bias closed form). Here each unit gets a random direction and a
    bias at the ``1 - rate`` quantile of its pre-activation on public images, so it fires for
    about ``rate`` of the data. Rows that give the same vector (one sample firing several
    units alone) are grouped; groups seen by several units come first (one sample for sure),
    then candidates whose pixels are valid (a mix with weights of opposite signs is not),
    up to the batch size.

    Conditions: a malicious server; a model whose first layer is fully connected with bias and
    a ReLU; one FedSGD gradient. Options: ``rate`` (default 0.02), ``seed``."""

    name = "trap-weights"
    paper = "Boenisch et al. 2023, When the Curious Abandon Honesty (EuroS&P; arXiv 2112.02918)"
    conditions = "malicious server; a first fully connected layer with bias and ReLU; a FedSGD gradient"
    surrogate_data = True      # public images place the server's weights: SoK threat model G

    def __init__(self, model, threat=None, *, rate: float = 0.02, seed: int = 0):
        from ..limits import check_float

        super().__init__(model, threat)
        self.rate = check_float("rate", rate, low_open=True, high=0.5)
        self.seed = seed
        self._layer: str | None = None

    def options(self):
        return {**super().options(), "rate": self.rate, "seed": self.seed}

    def serve(self, model: nn.Module, input_shape: tuple[int, ...], public: torch.Tensor | None) -> nn.Module:
        self._require_malicious()
        trace, linear = _first_input_layer(model, input_shape)
        weight = linear.weight
        directions = torch.randn(weight.shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
        if public is None:
            public = torch.randn((256, *input_shape), generator=torch.Generator().manual_seed(self.seed + 1),
                                 dtype=torch.float64)
        activations = public.flatten(1).double().cpu() @ directions.T          # (P, units)
        thresholds = torch.quantile(activations, 1 - self.rate, dim=0)
        with torch.no_grad():
            weight.copy_(directions.to(weight))
            linear.bias.copy_((-thresholds).to(linear.bias))
        self._layer = trace.name
        return model

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        self._require_malicious()
        trace, _ = _first_input_layer(self.model, update.input_shape)
        gradient = update.as_gradient()
        dW = gradient[trace.param("weight")].double()
        db = gradient[trace.param("bias")].double()
        fired = torch.nonzero(db.abs() > 1e-12 * db.abs().max().clamp_min(1e-300)).reshape(-1)
        if fired.numel() == 0:
            raise AttackNotApplicable("no unit of the trapped layer fired for this batch",
                                      condition="some unit of the first layer fires")
        candidates = torch.zeros_like(dW)
        candidates[fired] = dW[fired] / db[fired, None]
        groups = distinct_rows(candidates, fired)
        # rank: seen by several units alone first (one sample for sure), then candidates inside the
        # valid pixel box (a mix with weights of opposite signs leaves it), then by how many units saw them
        spec = update.data_spec
        def in_box(row: int) -> bool:
            x = candidates[row].reshape(1, *update.input_shape)
            x = spec.denormalize(x) if spec is not None else x
            return bool(((x > -0.01) & (x < 1.01)).all())

        ranked = sorted(groups, key=lambda g: (g[1] >= 2, in_box(g[0]), g[1]), reverse=True)
        plausible = sum(1 for g in ranked if g[1] >= 2 or in_box(g[0]))
        keep = ranked[: update.batch_size] if update.batch_size else ranked[:plausible]
        images = candidates[[row for row, _ in keep]].to(gradient[trace.param("weight")].dtype)
        images = images.reshape(-1, *update.input_shape)
        if update.data_spec is not None:
            images = update.data_spec.denormalize(images)
        notes = [f"{fired.numel()} of {db.numel()} trapped units fired; {len(groups)} distinct inputs, {plausible} "
                 f"plausible (seen by several units, or valid pixels); kept {len(keep)} (a unit fired by one sample "
                 "gives it exactly)"]
        return Reconstruction(images=images.detach(), notes=notes,
                              history={"units_fired": [float(fired.numel())]})


@register_attack
class ClassFishing(MaliciousAttack):
    """Fishing for one class (after Wen, Geiping, Fowl, Goldblum, Goldstein, "Fishing for User
    Data in Large-Batch Federated Learning via Gradient Magnification", ICML 2022, arXiv
    2202.00580): the server zeroes every row of the classifier except the target class's and
    pushes that class's bias far down. The error signal a sample sends back through the
    network is then ``w_t (p_t - [y = t])``: about ``-w_t`` for a sample of the target class and
    about zero for every other sample, so the gradient of every layer below the classifier is
    (almost) the gradient of the target-class samples alone, whatever the batch size. That
    magnified gradient is attacked as a batch of one with Inverting Gradients (the classifier's
    own gradient, which mixes every sample, is left out). Options: ``target`` (class index),
    ``margin`` (how far the target bias is pushed down; default 30), and any Inverting
    Gradients option (``iterations``, default 2000; ``tv``, ...).

    Conditions: a malicious server; a linear classifier layer; one sample of the target class
    in the batch (several come back as one mixed image)."""

    name = "fishing"
    paper = "Wen et al. 2022, Fishing for User Data in Large-Batch FL via Gradient Magnification (ICML)"
    conditions = "malicious server; a linear classifier; one sample of the target class in the batch"

    def __init__(self, model, threat=None, *, target: int = 0, margin: float = 30.0, **ig_options):
        from ..limits import check_float

        super().__init__(model, threat)
        self.target = check_int("target", target, 0, 1_000_000)
        self.margin = check_float("margin", margin, low_open=True)
        self.ig_options = {"iterations": 2000, **ig_options}
        from .optimization import MatchingConfig

        MatchingConfig(**self.ig_options)  # check the options now

    def options(self):
        return {**super().options(), "target": self.target, "margin": self.margin, **self.ig_options}

    def _classifier(self, model: nn.Module, input_shape: tuple[int, ...]):
        from ._layers import classifier_layer, trace_linear_layers

        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        head = classifier_layer(trace_linear_layers(model, input_shape, params, buffers))
        if head is None or not head.has_bias or head.out_features <= self.target:
            raise AttackNotApplicable(f"fishing needs a linear classifier with bias and more than {self.target} "
                                      "outputs", condition="a linear classifier layer with bias")
        return head

    def serve(self, model: nn.Module, input_shape: tuple[int, ...], public: torch.Tensor | None) -> nn.Module:
        self._require_malicious()
        head = self._classifier(model, input_shape)
        linear = dict(model.named_modules())[head.name]
        with torch.no_grad():
            keep = linear.weight[self.target].clone()
            linear.weight.zero_()
            linear.weight[self.target] = keep
            linear.bias.zero_()
            linear.bias[self.target] = -self.margin
        return model

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        from dataclasses import replace as _replace

        from ..threat import ThreatModel
        from .optimization import InvertingGradients

        self._require_malicious()
        head = self._classifier(self.model, update.input_shape)
        below = [n for n in update.tensors if n not in (head.param("weight"), head.param("bias"))]
        target = torch.tensor([self.target], device=next(iter(update.tensors.values())).device)
        fished = _replace(update, batch_size=1, labels=target)
        inner = InvertingGradients(self.model, ThreatModel(labels_known=True, server="malicious"),
                                   labels="given", layers=tuple(below), **self.ig_options)
        inner._hooks = self._hooks
        result = inner._reconstruct(fished)
        result.notes.insert(0, f"fished class {self.target}: the layers below the classifier carry (almost) only "
                               f"the target-class samples' gradient; attacked as a batch of one")
        return result
