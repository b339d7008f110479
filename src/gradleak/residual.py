"""The update residual: how well a reconstruction explains its update, without ground truth.

A server that audits its own federation never has the clients' data, so it cannot compute
PSNR. It has the update and the model, though: re-simulating the client's update from the
reconstructed batch ``(x̂, ŷ)`` under the protocol the update records, and comparing it with
the update observed, gives

    r = ||u(x̂, ŷ) - u_obs||_2 / ||u_obs||_2        over every shared entry,

where ``u`` is the FedSGD gradient of the batch mean loss, or the FedAvg delta of K local
SGD steps of rate lr in minibatches of b (step k on the reconstructed images
``(k b + j) mod B``, the schedule gradient matching unrolls). ``r = 0`` means the batch
produces exactly the update the server saw.

**Certified exact.** A reconstruction is certified when ``r`` is at most
:func:`certify_tolerance` of the precision the update is re-simulated in, ``1e4 eps``
(1.2e-3 in float32, 2.2e-12 in float64), it holds as many images as the update's batch, and
that batch size is known. Why ``1e4 eps``: a closed form inverts float32 data exactly only
up to the conditioning of its problem, and its images reproduce the update to ``kappa eps``
with an amplification ``kappa`` that grows with the batch and the depth (measured,
``benchmarks/residual.py cases``, float32: fc-bias on one photo 1.6e-7 at 149 dB, Qian on 4
photos 6.4e-8 at 164 dB and on 4 digits 5.2e-5 at 98 dB, Qian on 8 digits or photos 2.7e-4 to
5.6e-4 at 83-88 dB, R-GAP on a 16 px digit through LeNet 1.3e-5 at 93 dB; float64: 5e-16 to
1.2e-13 at 254-320 dB). All of those are certified. What stays above it: R-GAP on a 32 px
photo through LeNet (float32 3.2e-3 at 42 dB, an ill-conditioned system whose image is
visibly off; float64 5.6e-10 at 176 dB, an exact image left uncertified), every optimisation
result measured (Inverting Gradients: 0.05 to 0.22 at 13-24 dB), partial and perturbed
recoveries. A certificate says "this batch, with these labels, reproduces the update to r":
a statement about what the server holds, checked, not predicted. It says the batch is *the client's*
when the update determines its batch uniquely (a first fully connected layer's gradient
``sum_i delta_i x_i^T`` does, for one sample; the analyser's verdicts say when);
``docs/flower.md`` measures, over the example audit, that no certified reconstruction is
below 60 dB PSNR (lowest: 100.2 dB). It is one-sided: a defense that rescales the update
(clipping) leaves a closed form's image exact but its residual large, so "not certified" does
not mean "not exact".

**Partial recoveries are never certified.** The residual is that of the whole recovered
batch: an attack that returns k images for a batch of B (Qian with too few hidden units,
fc-bias on a batch, imprint bins) is re-simulated as a batch of k, which does not produce
the update of B, and ``k != B`` alone refuses the certificate.

**Labels.** The reconstruction's own labels (one per image) are used, else the labels the
threat model grants, else they are solved in closed form from the classifier layer's
gradient given the images (:func:`solve_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.func import grad

from .data.spec import DataSpec
from .errors import AttackNotApplicable, GradleakError, one_line
from .functional import forward, task_loss
from .losses import get_loss
from .shares import CARRIED_SHARE, carried, per_image_shares
from .update import SharedUpdate

__all__ = ["Residual", "update_residual", "reconstruction_residual", "simulate_update", "solve_labels", "update_shares",
           "certify_tolerance", "relative_distance", "CERTIFY_EPS", "residual_summary", "summary_text",
           "carried_text"]

CERTIFY_EPS = 1e4     # a residual of at most 1e4 machine epsilons certifies (see the module's notes)


def certify_tolerance(dtype: torch.dtype) -> float:
    """The largest residual certified exact when the update is re-simulated in ``dtype``:
    ``1e4 eps`` (float32: 1.19e-3, float64: 2.22e-12); lower precisions are never certified (0)."""
    return CERTIFY_EPS * torch.finfo(dtype).eps if dtype in (torch.float32, torch.float64) else 0.0


@dataclass(frozen=True)
class Residual:
    """The update residual of one reconstruction (see the module's notes).

    ``value``: ``||u(x̂, ŷ) - u_obs|| / ||u_obs||`` (None: not computable, ``reason`` says
    why). ``certified``: at most ``tolerance`` with the whole batch recovered. ``images``:
    images re-simulated; ``batch_size``: the update's (None: not known to the server).
    ``labels``: where the labels came from (``reconstruction``, ``shared``, ``solved``);
    ``label_values``: the labels re-simulated, one per image in the reconstruction's order.
    ``shares``: each image's share of the re-simulated update (:mod:`gradleak.shares`; None where
    the protocol couples the images or the batch holds one image)."""

    value: float | None
    certified: bool = False
    tolerance: float = 0.0
    images: int = 0
    batch_size: int | None = None
    labels: str = ""
    reason: str = ""
    label_values: tuple[int, ...] | None = None
    shares: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "certified": self.certified, "tolerance": self.tolerance, "images": self.images,
                "batch_size": self.batch_size, "labels": self.labels, "reason": self.reason,
                "label_values": None if self.label_values is None else list(self.label_values),
                "shares": None if self.shares is None else list(self.shares)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "Residual | None":
        if not isinstance(data, Mapping):
            return None
        value = data.get("value")
        labels, shares = data.get("label_values"), data.get("shares")
        return cls(None if value is None else float(value), bool(data.get("certified")),
                   float(data.get("tolerance") or 0.0), int(data.get("images") or 0), data.get("batch_size"),
                   str(data.get("labels") or ""), str(data.get("reason") or ""),
                   None if not isinstance(labels, list) else tuple(int(v) for v in labels),
                   tuple(float(v) for v in shares) if isinstance(shares, list) and all(
                       isinstance(v, (int, float)) and not isinstance(v, bool) for v in shares) else None)

    def describe(self) -> str:
        """One line: ``residual 3.1e-08: CERTIFIED EXACT (...)`` or why it is not."""
        if self.value is None:
            return f"residual n/a ({self.reason})"
        text = f"residual {self.value:.2g}"
        return f"{text}: CERTIFIED EXACT ({self.reason})" if self.certified else f"{text} ({self.reason})"


def relative_distance(simulated: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]) -> float:
    """``||simulated - observed|| / ||observed||`` over the entries of ``observed`` (float64 sums);
    inf when the observed update is zero and the simulated one is not, nan when a value is."""
    diff = norm = 0.0
    for name, target in observed.items():
        target = target.detach().double()
        diff += float((simulated[name].detach().double() - target).pow(2).sum())
        norm += float(target.pow(2).sum())
    if math.isnan(diff):
        return math.nan
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / norm)


def _state(model: nn.Module, update: SharedUpdate) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The client's parameters at the round (the update's weights when it carries them) and the model's buffers,
    as :meth:`gradleak.attacks.base.Attack.parameters_at_round` gives them to the attacks."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    if update.weights is not None:
        params.update({n: w.to(device=params[n].device, dtype=params[n].dtype)
                       for n, w in update.weights.items() if n in params})
    return params, {n: b.detach().clone() for n, b in model.named_buffers()}


class _Mode:
    """The model in the mode the update records (train-mode BatchNorm, as the client ran), restored after."""

    def __init__(self, model: nn.Module, mode: str | None):
        self.model, self.mode, self.was = model, mode, model.training

    def __enter__(self):
        if self.mode is not None:
            self.model.train(self.mode == "train")

    def __exit__(self, *exc):
        self.model.train(self.was)


def simulate_update(model: nn.Module, update: SharedUpdate, images: torch.Tensor,
                    labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The update ``model`` would produce from ``images`` ([0, 1], normalised with the update's
    data spec) and ``labels`` under the update's protocol: the gradient of the mean loss, or
    the delta of its local SGD steps (step k on images ``(k b + j) mod B``). Raises
    AttackNotApplicable when the protocol is not known well enough to simulate."""
    params, buffers = _state(model, update)
    ref = next(iter(params.values()))
    x = _inputs(update, images, ref)
    y = labels.to(ref.device)
    loss_fn = get_loss(update.loss)
    with _Mode(model, update.mode):
        if update.kind == "gradient":
            return {n: g.detach() for n, g in grad(task_loss(model, buffers, loss_fn, x, y))(params).items()}
        if update.local_lr is None:
            raise AttackNotApplicable("the delta's learning rate is unknown: its local steps cannot be re-simulated",
                                      condition="FedAvg learning rate known")
        n = x.shape[0]
        batch = min(update.local_batch_size or n, n)
        local = dict(params)
        for k in range(update.local_steps):
            idx = torch.tensor([(k * batch + j) % n for j in range(batch)], device=x.device)
            g = grad(task_loss(model, buffers, loss_fn, x[idx], y[idx]))(local)
            local = {name: local[name] - update.local_lr * g[name] for name in local}
        return {name: (local[name] - params[name]).detach() for name in params}


def _inputs(update: SharedUpdate, images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """What the model is fed: images normalised with the update's data spec, token ids as they are."""
    if not images.is_floating_point():
        return images.to(ref.device)
    return (update.data_spec or DataSpec()).normalize(images.to(device=ref.device, dtype=ref.dtype))


def _head(model: nn.Module, update: SharedUpdate, images: torch.Tensor, params, buffers):
    """The classifier layer (a ``LinearTrace``-like: name, has_bias, param) of an image model, or of a
    text classifier (``score`` of GPT-2, ``classifier`` of BERT, found by name: a probe of random
    floats is no token sequence)."""
    from .attacks._layers import LinearTrace, classifier_layer, trace_linear_layers

    if images.is_floating_point():
        return classifier_layer(trace_linear_layers(model, update.input_shape or tuple(images.shape[1:]), params,
                                                    buffers))
    from .text.arch import TransformerView

    view = TransformerView(model)
    for name in ("score", "classifier"):
        module = dict(model.named_modules()).get(view.prefix + name)
        if isinstance(module, nn.Linear):
            return LinearTrace(view.prefix + name, module.in_features, module.out_features, module.bias is not None,
                               False, True)
    return None


def solve_labels(model: nn.Module, update: SharedUpdate, images: torch.Tensor) -> torch.Tensor:
    """The labels of ``images`` that explain the classifier layer's gradient, in closed form.

    For the mean cross-entropy over B samples, ``dL/dW = (P - Y)^T H / B`` and ``dL/db =
    (P - Y)^T 1 / B``, with P the softmax outputs, H the classifier's input features (both
    computed from the images) and Y the one-hot labels. So ``[H 1]^T Y = [H 1]^T P - B [dW db]^T``,
    solved for Y by least squares (exact when the B feature vectors are independent) and
    rounded to one class per image; for one sigmoid output Y is the 0/1 column. A delta of
    K steps is read as the gradient ``-delta / (lr K)`` (an approximation for K > 1, as the
    attacks' label counting does). Raises AttackNotApplicable without a linear classifier layer."""
    params, buffers = _state(model, update)
    head = _head(model, update, images, params, buffers)
    if head is None:
        raise AttackNotApplicable("no linear classifier layer produces the output: the labels cannot be solved",
                                  condition="a linear classifier layer")
    if update.kind == "gradient":
        gradient = update.tensors
    elif update.local_lr is not None:
        gradient = {n: -t / (update.local_lr * update.local_steps) for n, t in update.tensors.items()}
    else:
        raise AttackNotApplicable("the delta's learning rate is unknown", condition="FedAvg learning rate known")
    ref = next(iter(params.values()))
    x = _inputs(update, images, ref)
    features: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[head.name].register_forward_hook(
        lambda module, inputs, output: features.__setitem__("h", inputs[0]))
    try:
        with torch.no_grad(), _Mode(model, update.mode):
            logits = forward(model, params, buffers, x)
    finally:
        handle.remove()
    B = x.shape[0]
    h = features["h"]
    if h.dim() == 3:       # GPT-2's score reads every position; the loss, the last one (no padding in gradleak's text)
        h = h[:, -1]
    h = h.reshape(B, -1).double()
    binary = update.loss == "binary_cross_entropy"
    p = torch.sigmoid(logits.reshape(B, 1)).double() if binary else logits.double().softmax(-1)
    g = gradient[head.param("weight")].double().reshape(p.shape[1], -1)
    design = h
    if head.has_bias:
        g = torch.cat([g, gradient[head.param("bias")].double().reshape(-1, 1)], dim=1)
        design = torch.cat([h, torch.ones(B, 1, dtype=h.dtype, device=h.device)], dim=1)
    rhs = design.T @ p - B * g.T                      # (F [+1]) x C  =  design^T Y
    y = torch.linalg.lstsq(design.T, rhs).solution     # B x C
    labels = (y.reshape(-1) > 0.5).to(torch.int64) if binary else y.argmax(-1)
    return labels.to(images.device)


def _labels(model, update, images, labels) -> tuple[torch.Tensor, str]:
    n = images.shape[0]
    if update.loss == "causal_lm":          # a language model's targets are its own tokens
        return images, "own-token"
    if labels is not None and labels.numel() == n:
        return labels.reshape(-1), "reconstruction"
    if update.labels is not None and update.labels.numel() == n:
        return update.labels, "shared"
    return solve_labels(model, update, images), "solved"


def update_shares(model: nn.Module, update: SharedUpdate, images: torch.Tensor,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's share of the FedSGD update that ``images`` (with ``labels``, else the shared or
    solved ones) produce under ``update``'s protocol: ``||g_i||^2 / sum_j ||g_j||^2``, float64, one per
    image (:mod:`gradleak.shares`: which images an update carries). Raises AttackNotApplicable for a
    FedAvg delta and for train-mode BatchNorm, where the images have no gradient of their own."""
    if update.kind != "gradient":
        raise AttackNotApplicable("per-image shares: a FedAvg delta of local steps is not a sum of per-image "
                                  "gradients", condition="a FedSGD gradient")
    y, _ = _labels(model, update, images, labels)
    params, buffers = _state(model, update)
    ref = next(iter(params.values()))
    with _Mode(model, update.mode):
        return per_image_shares(model, params, buffers, get_loss(update.loss), _inputs(update, images, ref),
                                y.to(ref.device))


def _shares_or_none(model, update, images, labels) -> tuple[float, ...] | None:
    """:func:`update_shares` where the protocol allows it and the batch holds 2 or more images; else None."""
    if images.shape[0] < 2:
        return None
    try:
        return tuple(float(v) for v in update_shares(model, update, images, labels))
    except AttackNotApplicable:
        return None


def update_residual(model: nn.Module, update: SharedUpdate, images: torch.Tensor | None,
                    labels: torch.Tensor | None = None) -> Residual:
    """The residual of ``images`` (with ``labels``, else the shared or solved ones) against
    ``update``, as the server observes it; never raises for the reconstruction's own
    shortcomings (no image, no classifier, unknown lr, a diverged image): ``value`` None
    or inf with the reason."""
    batch = update.batch_size
    if images is None or images.ndim < 2 or images.shape[0] == 0:
        return Residual(None, batch_size=batch, reason="no image reconstructed")
    n = int(images.shape[0])
    if not images.is_floating_point():      # token ids (a text attack)
        if update.input_shape and tuple(images.shape[1:]) != tuple(update.input_shape):
            return Residual(None, images=n, batch_size=batch, reason="no sequences of the update's length (a token "
                                                                   "set?)")
        if bool((images < 0).any()):
            return Residual(None, images=n, batch_size=batch, reason="some token positions were not recovered: the "
                                                                   "update cannot be re-simulated")
    elif not bool(torch.isfinite(images).all()):
        return Residual(math.inf, images=n, batch_size=batch, reason="the reconstruction holds NaN or infinite values")
    try:
        y, source = _labels(model, update, images, labels)
        simulated = simulate_update(model, update, images, y)
    except GradleakError as error:
        return Residual(None, images=n, batch_size=batch, reason=one_line(error, 200))
    dtype = next(iter(simulated.values())).dtype
    value, tolerance = relative_distance(simulated, update.tensors), certify_tolerance(dtype)
    kind = "image(s)" if images.is_floating_point() else "sequence(s)"
    used = tuple(int(v) for v in y.reshape(-1).tolist())
    shares = _shares_or_none(model, update, images, y) if math.isfinite(value) else None
    if batch is None:
        why = f"the batch size is not known to the server: {n} {kind} re-simulated"
    elif n != batch:
        why = f"{n} {kind} recovered of a batch of {batch}: a partial recovery is never certified"
    elif not value <= tolerance:
        why = f"above the {tolerance:.2g} that certifies a {str(dtype).replace('torch.', '')} re-simulation"
    else:
        return Residual(value, True, tolerance, n, batch, source,
                        f"the {n} recovered {kind} and their {source} labels reproduce the update to {value:.1g}",
                        used, shares)
    return Residual(value, False, tolerance, n, batch, source, why, used, shares)


def reconstruction_residual(model: nn.Module, update: SharedUpdate, reconstruction: Any,
                            threat: Any = None) -> Residual:
    """:func:`update_residual` of a :class:`~gradleak.attacks.Reconstruction` against the
    update as ``threat`` (a :class:`~gradleak.threat.ThreatModel`) lets the attacker see it:
    labels the attacker was not granted are never used."""
    observed = threat.observe(update) if threat is not None else update
    inputs = reconstruction.images
    if inputs is None and getattr(reconstruction, "tokens", None) is not None:   # text: the recovered token ids
        inputs = reconstruction.tokens
    return update_residual(model, observed, inputs, reconstruction.labels)


def residual_summary(residuals: list[Residual]) -> dict[str, Any]:
    """What a run's ``metrics.json`` records under ``"residual"``: how many updates, how many
    certified exact, the median and largest residual, and each update's residual."""
    values = sorted(r.value for r in residuals if r.value is not None and not math.isnan(r.value))
    median = None if not values else (values[len(values) // 2] if len(values) % 2 else
                                      0.5 * (values[len(values) // 2 - 1] + values[len(values) // 2]))
    return {"updates": len(residuals), "certified": sum(r.certified for r in residuals), "median": median,
            "max": values[-1] if values else None, "per_update": [r.to_json() for r in residuals]}


def summary_text(summary: Mapping[str, Any]) -> str:
    """``residual 3.1e-08, certified exact`` (one update) or ``residual median 0.05 (1 of 4 updates
    certified exact)``, from :func:`residual_summary`'s dict."""
    count, certified, median = summary.get("updates") or 0, summary.get("certified") or 0, summary.get("median")
    if not count:
        return "residual n/a"
    value = "n/a" if not isinstance(median, (int, float)) else f"{median:.2g}"
    if count == 1:
        return f"residual {value}" + (", certified exact" if certified else "")
    return f"residual median {value} ({certified} of {count} updates certified exact)"


def carried_text(summary: Mapping[str, Any]) -> str:
    """``1 of 4 images carry their update (share >= 1 %)`` from :func:`residual_summary`'s dict, where
    every update recorded its inputs' shares (sequences for a language model's own tokens); else ``""``."""
    updates = [u for u in summary.get("per_update") or [] if isinstance(u, Mapping)]
    shares = [u.get("shares") for u in updates]
    if not shares or not all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              for x in v) for v in shares):
        return ""
    values = [float(x) for v in shares for x in v]
    kind = "sequences" if all(u.get("labels") == "own-token" for u in updates) else "images"
    return f"{carried(values)} of {len(values)} {kind} carry their update (share >= {100 * CARRIED_SHARE:g} %)"
