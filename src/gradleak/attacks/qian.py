"""Qian et al., minimal model structure for input reconstruction (arXiv 2010.15718, seed 001).

- **Single input, any depth.** A fully connected layer with bias fed the input gives
  ``x = row_j(dL/dW) / dL/db_j`` for any unit with ``dL/db_j != 0``: one hidden unit
  suffices, whatever comes after it (:func:`~gradleak.attacks.analytic.fc_bias_inversion`).
- **A batch of B** (:func:`qian_batch_inversion`). The mean gradient is
  ``dL/dW = sum_i delta_i x_i^T``, ``dL/db = sum_i delta_i`` (delta_i: the unit signals of
  sample i), so row ratio j is ``sum_i w_ji x_i`` with weights ``w_ji = delta_ji / sum_i
  delta_ji``: a mixture of the samples active at unit j. A unit active for exactly one
  sample (ReLU zeroes the others) gives that sample exactly, and every such unit gives
  the same row: duplicated rows are recovered samples. Recovered samples are then peeled
  off: a unit inactive on every recovered sample mixes only the others, so the search
  repeats on those units; with one sample left, any such unit gives it. This needs at
  least B hidden units (Qian's condition h >= B; the gradient has rank <= h) and units
  that separate the samples; the result says which samples were recovered and which not.
- **Perturbed gradients** (``robust=True``, the default). Noise, pruning or quantisation
  leave no two rows exactly alike; the gradient's best rank-B approximation (truncated SVD)
  removes the perturbation outside the samples' subspace, and its rows are grouped with
  the tightest tolerance that isolates the samples: best estimates, noted APPROXIMATE.
- **CNNs** (:func:`qian_cnn_condition`, :func:`qian_cnn_inversion`). With the input of the
  first fully connected layer recovered as above, each convolution below is inverted from
  its output (weight constraints, least squares). That is exact when the convolution, as
  a matrix, has at least as many outputs as inputs: ``h >= (d/d')^2 C`` kernels for input
  width d, output width d', C input channels, and the activation is invertible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AttackNotApplicable
from ..limits import check_bool, check_float
from ..threat import ThreatModel
from ..update import SharedUpdate
from ._chain import SOLVE_DTYPE, ChainLayer, act_inverse, act_known, layer_system, solve_normal, trace_chain
from ._layers import trace_linear_layers
from ._qian_batch import exact_mixture, isolate, perturbed, robust_isolate, separate
from .base import Attack, Reconstruction, register_attack

__all__ = ["QianInversion", "QianBatch", "qian_batch_inversion", "qian_cnn_condition", "QianCNNCheck",
           "qian_cnn_inversion"]


@dataclass
class QianBatch:
    """Result of :func:`qian_batch_inversion`.

    x: (k, in_features) the samples recovered exactly (k <= batch size, order arbitrary).
    units: for each recovered sample, the hidden units that isolate it.
    approximate: the samples are best estimates from a perturbed gradient (``robust``), not exact.
    batch_size: the B used (given, or the rank of dL/dW); rank: numerical rank of dL/dW.
    """

    x: torch.Tensor
    units: list[list[int]]
    batch_size: int
    rank: int
    notes: list[str] = field(default_factory=list)
    approximate: bool = False

    @property
    def complete(self) -> bool:
        return self.x.shape[0] == self.batch_size


def qian_batch_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, *, batch_size: int | None = None, activation: str = "relu",
                         tol: float | None = None, trials: int = 20000, robust: bool = False) -> QianBatch:
    """Recover the inputs of a batch from the mean gradient of a fully connected layer with bias.

    ``weight``/``bias`` are the layer's parameters (to tell which units each recovered
    sample activates). Valid for ReLU layers (inactive units are what separates samples);
    for other activations only a single sample is recovered. Raises
    :class:`AttackNotApplicable` when no sample can be isolated, unless ``robust``: where
    fewer than B samples come out exactly (a gradient perturbed by noise, pruning or
    quantisation), the best estimates from its rank-B approximation are returned, marked
    ``approximate`` (:func:`~gradleak.attacks._qian_batch.robust_isolate`; needs the batch size when the gradient is
    perturbed, since its rank no longer tells it).
    """
    dt = SOLVE_DTYPE
    dW, db = weight_grad.to(dt), bias_grad.to(dt)
    W, b = weight.to(dt), bias.to(dt)
    eps = torch.finfo(weight_grad.dtype).eps
    tol = tol if tol is not None else 10 * eps ** 0.5
    hidden = dW.shape[0]
    s = torch.linalg.svdvals(dW)
    rank = int((s > s[0] * 1e3 * eps).sum()) if s.numel() and s[0] > 0 else 0
    B = batch_size or rank
    notes = [f"{hidden} hidden units, batch of {B}{'' if batch_size else ' (batch size from the rank of dL/dW)'}; "
             f"rank of dL/dW {rank}"]
    if hidden < B:
        notes.append(f"Qian's condition fails: {hidden} hidden units < batch size {B}; at most {hidden} samples "
                     "can be separated")
    active = torch.nonzero(db != 0).reshape(-1)
    if B > 1 and hidden >= B and rank >= B and activation == "relu":
        X = separate(dW, db, W, b, B, tol, trials)
        if X is not None:
            z = X @ W.T + b
            units = [torch.nonzero(z[i] > 0).reshape(-1).tolist() for i in range(B)]
            notes.append(f"all {B} samples recovered exactly: the units inactive for each sample span a hyperplane "
                         "that separates it from the others")
            return QianBatch(X.to(weight_grad.dtype), units, B, rank, notes)
    if active.numel() == 0:
        raise AttackNotApplicable("every dL/db_j is zero: the gradient carries no information about the inputs",
                                  condition="some dL/db_j != 0")
    found, units = isolate(dW, db, W, b, B, activation, tol)
    if robust and perturbed(dW, db, B, eps) and not exact_mixture(found, dW, db, W, b, B, 1e3 * eps):
        estimates, estimate_units, used, residual = robust_isolate(dW, db, W, b, B, activation)
        if estimates:
            notes.append(f"APPROXIMATE: the gradient is not explained exactly by {B} samples (rank-{B} residual "
                         f"{residual:.2e}: perturbed by a defense, or another batch size); the samples are best "
                         f"estimates from its rank-{B} approximation (" + (f"rows grouped within {used:g}" if used != float("inf") else "no rows agree: the strongest units, one each") + ")")
            x = torch.stack(estimates).to(weight_grad.dtype)
            return QianBatch(x, estimate_units, B, rank, notes, approximate=True)
    if not found:
        raise AttackNotApplicable(
            f"no sample of the batch of {B} could be separated ({activation} layer, {hidden} units"
            + (f"; h >= B holds, but about h/2 = {hidden // 2} units are inactive per sample, too few to pin down the "
               f"{B - 1}-dimensional hyperplane that isolates each sample" if hidden >= B and activation == "relu" else "")
            + "): every row of dL/dW mixes several samples", condition="units that separate the samples (ReLU units, enough inactive per sample)")
    x = torch.stack(found).to(weight_grad.dtype)
    if len(found) == B:
        notes.append(f"all {B} samples recovered exactly (each isolated by >= 1 hidden unit)")
    else:
        notes.append(f"recovered {len(found)} of {B} samples exactly; {B - len(found)} not recoverable: no hidden "
                     "unit is active for them alone (their rows of dL/dW stay mixtures)")
    return QianBatch(x, units, B, rank, notes)


@dataclass
class QianCNNCheck:
    """Qian's CNN condition for one convolution: kernels ``h >= (d/d')^2 C``."""

    layer: str
    in_channels: int
    in_width: int
    out_width: int
    kernels: int

    @property
    def required(self) -> float:
        return (self.in_width / self.out_width) ** 2 * self.in_channels

    @property
    def holds(self) -> bool:
        return self.kernels >= self.required - 1e-9

    def describe(self) -> str:
        verdict = "holds" if self.holds else "fails"
        return (f"{self.layer!r}: h = {self.kernels} kernels vs (d/d')^2 C = ({self.in_width}/{self.out_width})^2 x "
                f"{self.in_channels} = {self.required:.3g}: {verdict}")


def qian_cnn_condition(layer: ChainLayer) -> QianCNNCheck:
    """Qian's condition for a convolution ``layer`` of the chain."""
    _, _, d = layer.in_shape
    return QianCNNCheck(layer.name, layer.in_shape[0], d, layer.out_shape[-1], layer.out_shape[0])


def qian_cnn_inversion(layers: list[ChainLayer], params: dict[str, torch.Tensor], features: torch.Tensor,
                       *, rtol: float = 1e-10):
    """Invert the convolutions ``layers`` (input first) from the features their last activation produced.

    Returns (input (C, H, W) in SOLVE_DTYPE, [(check, rank deficit), ...] from input to top).
    """
    x = features.to(SOLVE_DTYPE)
    report = []
    for layer in reversed(layers):
        a = x.reshape(layer.out_shape)
        target = act_inverse(layer.activation, layer.slope, a)
        if layer.has_bias:
            target = target - params[layer.param("bias")].to(SOLVE_DTYPE).reshape(-1, 1, 1)
        system = layer_system(layer, params[layer.param("weight")], None, None, target, act_known(layer.activation, a))
        solution = solve_normal(system, rtol=rtol)
        report.append((qian_cnn_condition(layer), solution.deficit))
        x = solution.x
    return x.reshape(layers[0].in_shape), report[::-1]


@register_attack
class QianInversion(Attack):
    """Closed-form reconstruction of a single input or a batch (Qian et al.)."""

    name = "qian"
    paper = "Qian, Nassar & Hansen 2020, Minimal model structure analysis for input reconstruction in FL (arXiv 2010.15718)"
    conditions = ("a fully connected layer with bias (fed the input, or after convolutions meeting h >= (d/d')^2 C "
                  "with invertible activations); batches: >= B hidden units and ReLU units that isolate each sample; "
                  "a perturbed gradient (noise, pruning) gives best estimates, noted APPROXIMATE (robust=True, "
                  "batch size known)")

    def __init__(self, model, threat: ThreatModel | None = None, *, tol: float | None = None, robust: bool = True):
        super().__init__(model, threat)
        self.tol = check_float("tol", tol, optional=True)
        self.robust = check_bool("robust", robust)

    def options(self):
        return {**super().options(), "tol": self.tol, "robust": self.robust}

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        traces = trace_linear_layers(self.model, update.input_shape, params, buffers)
        target = next((t for t in traces if t.has_bias), None)
        if target is None:
            raise AttackNotApplicable("the model has no fully connected layer with bias",
                                      condition="a fully connected layer with bias")
        chain = trace_chain(self.model, update.input_shape, params, buffers)
        names = [l.name for l in chain.layers]
        position = names.index(target.name) if target.name in names else -1
        activation = chain.layers[position].activation if position >= 0 else "relu"
        below = chain.layers[:position] if position > 0 else []
        if not target.receives_model_input and (not chain.is_chain or any(l.kind != "conv2d" for l in below)):
            raise AttackNotApplicable(
                f"the first linear layer with bias ({target.name!r}) is not fed the input and the layers below it are "
                "not a plain chain of convolutions" + (f" ({'; '.join(chain.unsupported)})" if chain.unsupported else ""),
                condition="a fully connected layer with bias fed the input, or by a chain of convolutions")
        batch = qian_batch_inversion(gradient[target.param("weight")], gradient[target.param("bias")],
                                     params[target.param("weight")], params[target.param("bias")],
                                     batch_size=update.batch_size, activation=activation, tol=self.tol,
                                     robust=self.robust and update.batch_size is not None)
        notes = [f"layer {target.name!r}: " + n for n in batch.notes]
        dtype = next(iter(gradient.values())).dtype
        if target.receives_model_input:
            x = batch.x.reshape(-1, *update.input_shape)
        else:
            images, deficits = [], []
            for features in batch.x:
                xi, report = qian_cnn_inversion(below, params, features)
                images.append(xi)
                deficits = report
            x = torch.stack(images).to(dtype)
            for check, deficit in deficits:
                notes.append(f"Qian's CNN condition {check.describe()}; rank deficit of the inversion {deficit}")
            if batch.approximate:
                notes.append("the features are estimates: so are the images inverted from them")
            elif all(check.holds and deficit == 0 for check, deficit in deficits):
                notes.append("every convolution is injective: the images are exact")
            else:
                notes.append("some convolution loses information: the images are minimum-norm estimates, not exact")
        spec = update.data_spec
        images = spec.denormalize(x) if spec is not None else x
        history = {"units_per_sample": [float(len(u)) for u in batch.units]}
        return Reconstruction(images=images, history=history, notes=notes,
                              config={"recovered": int(batch.x.shape[0]), "batch_size": batch.batch_size})
