"""The pieces of gradient matching: which layers to compare, how to weight them, the
distance between a candidate's gradient (or update) and the observed one, and the image
priors. The optimisation engine (:mod:`.optimization`) composes them.

Distances (``objective``):
- ``l2``: ``sum_i w_i ||g_i - t_i||^2`` (DLG, Zhu et al. 2019);
- ``l1``: ``sum_i w_i |g_i - t_i|_1``; ``max``: ``max_i w_i max|g_i - t_i|``;
- ``l2+l1``: ``l2 + 0.01 l1`` (TAG, Deng et al. 2021, for transformers);
- ``cosine``: one cosine distance over all selected layers together,
  ``1 - <g, t>_w / (||g||_w ||t||_w)`` (Inverting Gradients' "sim", Geiping et al. 2020);
- ``layer-cosine``: the weighted mean of per-layer cosine distances.

Layer weights (``layer_weights``): ``equal``; ``linear``, decreasing from 1 at the first
selected layer to 1/L at the last (Inverting Gradients' "linear"); ``exp``, decaying from 1
to e^-4. Priors: anisotropic total variation, squared L2 norm of the input, and the
BatchNorm-statistics prior of Yin et al. 2021 ("See through gradients"). Between restarts:
the group-consistency term of Yin et al. 2021, each restart's distance to the group's
consensus (here the pixel-wise mean of the restarts, without their image registration).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import AttackNotApplicable, ConfigError
from ..functional import forward

__all__ = ["OBJECTIVES", "LAYER_WEIGHTS", "select_layers", "layer_weights", "gradient_distance",
           "total_variation", "BatchNormStatistics", "batch_norm_targets", "consensus", "group_consistency",
           "observed_output_gradient", "output_functional"]

OBJECTIVES = ("l2", "l1", "max", "cosine", "layer-cosine", "l2+l1")
TAG_L1 = 0.01   # the weight of the L1 term of "l2+l1" (TAG, Deng et al. 2021)
LAYER_WEIGHTS = ("equal", "linear", "exp")


def select_layers(names: Sequence[str], target: Mapping[str, torch.Tensor], selection: str | Sequence[str]) -> list[str]:
    """Which entries of the update to match, in model order.

    ``selection``: ``"all"``, ``"first:k"``, ``"last:k"``, ``"largest:k"`` (by the observed
    norm), or explicit parameter names (a list, or a comma-separated string).
    """
    names = [n for n in names if n in target]
    if isinstance(selection, str):
        kind, _, count = selection.partition(":")
        if selection == "all":
            return names
        if kind in ("first", "last", "largest") and count:
            try:
                k = int(count)
            except ValueError:
                raise ConfigError(f"layers={selection!r}: expected {kind}:<count>") from None
            if not 1 <= k <= len(names):
                raise ConfigError(f"layers={selection!r}: count must be between 1 and {len(names)}")
            if kind == "first":
                return names[:k]
            if kind == "last":
                return names[-k:]
            norms = {n: float(torch.linalg.vector_norm(target[n])) for n in names}
            chosen = set(sorted(names, key=norms.__getitem__, reverse=True)[:k])
            return [n for n in names if n in chosen]
        selection = [s.strip() for s in selection.split(",") if s.strip()]
    unknown = [s for s in selection if s not in names]
    if unknown or not selection:
        raise ConfigError(f"layers: {unknown or selection!r} not in the update; entries are e.g. {names[:4]}")
    return [n for n in names if n in set(selection)]


def layer_weights(count: int, scheme: str, *, dtype=torch.float32, device=None) -> torch.Tensor:
    if scheme == "equal":
        return torch.ones(count, dtype=dtype, device=device)
    if scheme == "linear":
        return torch.arange(count, 0, -1, dtype=dtype, device=device) / count
    if scheme == "exp":
        return torch.exp(-4.0 * torch.arange(count, dtype=dtype, device=device) / max(count - 1, 1))
    raise ConfigError(f"layer_weights must be one of {LAYER_WEIGHTS}, got {scheme!r}")


def _unit_scaled(v: torch.Tensor) -> torch.Tensor:
    """``v`` divided by its largest magnitude (a constant: no gradient flows through it), so that
    the squares of a cosine never underflow. A confidently classified candidate's gradient can be
    ~1e-20 per entry: its squared norm then underflows in float32 while its dot product with the
    observed gradient does not, and the "cosine" came out far outside [-1, 1] (a matching loss of
    -95 was recorded). Cosines are scale-invariant, so the value and its gradient are unchanged."""
    return v / v.detach().abs().amax().clamp_min(torch.finfo(v.dtype).tiny)


def gradient_distance(candidate: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], names: Sequence[str],
                      weights: torch.Tensor, objective: str, uniform: bool | None = None) -> torch.Tensor:
    """The distance between the candidate's and the observed gradients over ``names``.
    ``uniform``: every weight is 1 (None: look at ``weights``; the caller that knows it says
    so, which keeps the function free of data-dependent branches under ``torch.compile``)."""
    if objective == "l2":
        return sum(w * (candidate[n] - target[n]).pow(2).sum() for n, w in zip(names, weights))
    if objective == "l1":
        return sum(w * (candidate[n] - target[n]).abs().sum() for n, w in zip(names, weights))
    if objective == "l2+l1":
        return sum(w * ((candidate[n] - target[n]).pow(2).sum() + TAG_L1 * (candidate[n] - target[n]).abs().sum())
                   for n, w in zip(names, weights))
    if objective == "max":
        return torch.stack([w * (candidate[n] - target[n]).abs().max() for n, w in zip(names, weights)]).max()
    if objective == "cosine":
        # the layers as one flat vector per side: three reductions instead of three per layer
        # (fewer kernels per iteration, which is most of what a small model's iteration costs)
        cand = _unit_scaled(torch.cat([candidate[n].reshape(-1) for n in names]))
        targ = _unit_scaled(torch.cat([target[n].reshape(-1) for n in names]))
        if bool((weights == 1).all()) if uniform is None else uniform:
            dot, cc, tt = (cand * targ).sum(), (cand * cand).sum(), (targ * targ).sum()
        else:
            w = torch.repeat_interleave(weights, torch.tensor([target[n].numel() for n in names], device=weights.device))
            dot, cc, tt = (w * cand * targ).sum(), (w * cand * cand).sum(), (w * targ * targ).sum()
        return 1 - dot / (cc.sqrt() * tt.sqrt()).clamp_min(1e-30)
    if objective == "layer-cosine":
        terms = [w * (1 - torch.nn.functional.cosine_similarity(_unit_scaled(candidate[n].flatten()),
                                                                   _unit_scaled(target[n].flatten()), dim=0, eps=1e-30))
                 for n, w in zip(names, weights)]
        return sum(terms) / weights.sum()
    raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of vertical and horizontal neighbours."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def consensus(X: torch.Tensor) -> torch.Tensor:
    """The consensus of a group of restarts ``X`` (R, B, C, H, W): their pixel-wise mean."""
    return X.mean(0)


def group_consistency(X: torch.Tensor) -> torch.Tensor:
    """Yin et al. 2021's group-consistency term for every restart of the group ``X`` (R, ...):
    the mean squared distance of each restart to the consensus, ``mean((x_r - xbar)^2)``, (R,).

    Yin et al. register every restart onto the group mean (RANSAC-flow) before averaging;
    this is the unregistered, pixel-wise form. The gradient of the group's total with respect
    to restart r is ``2 (x_r - xbar) / n`` (n pixels per restart) whether or not ``xbar`` is
    held fixed, since the deviations from the mean sum to zero: each restart is pulled towards
    the consensus, and a group that agrees pays nothing.
    """
    return (X - consensus(X)).pow(2).flatten(1).mean(1)


def batch_norm_targets(model: nn.Module, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The client's batch statistics, recovered exactly from its BatchNorm running statistics.

    A train-mode BatchNorm with momentum m updates ``r1 = (1 - m) r0 + m s`` where s is the
    batch mean (or unbiased variance), so ``s = (r1 - (1 - m) r0) / m``. Returns
    ``{module name: (mean, unbiased variance)}``.
    """
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.track_running_stats:
            continue
        keys = [f"{name}.running_mean", f"{name}.running_var"]
        if not all(k in before and k in after for k in keys):
            continue
        m = module.momentum if module.momentum is not None else 0.1
        mean = (after[keys[0]] - (1 - m) * before[keys[0]]) / m
        var = (after[keys[1]] - (1 - m) * before[keys[1]]) / m
        targets[name] = (mean, var)
    return targets


class BatchNormStatistics:
    """Yin et al. 2021's prior: the candidate batch's BatchNorm input statistics should
    equal the client's, ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2``.

    Use as a context manager around a forward pass; ``penalty()`` reads what it recorded.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.targets = model, dict(targets)
        self._seen: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name in self.targets:
            self._handles.append(modules[name].register_forward_pre_hook(
                lambda module, inputs, name=name: self._seen.__setitem__(name, inputs[0])))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def penalty(self) -> torch.Tensor:
        total = 0.0
        for name, (mean, var) in self.targets.items():
            x = self._seen[name]
            dims = [0, *range(2, x.ndim)]
            total = total + torch.linalg.vector_norm(x.mean(dims) - mean) + torch.linalg.vector_norm(
                x.var(dims, unbiased=True) - var)
        self._seen.clear()
        return total if isinstance(total, torch.Tensor) else torch.tensor(math.nan)


def observed_output_gradient(update, head, batch: int, mode: str) -> tuple[torch.Tensor | None, str]:
    """The gradient of the client's loss with respect to the model output, read off the update.

    For a classifier layer ``z = W h + b`` and one image, ``dL/db = dL/dz = delta`` (Geiping
    et al. 2020, §4: the bias gradient of a fully connected layer is its output gradient), so
    the client's whole gradient is ``J(x)^T delta`` with ``J`` the Jacobian of the output with
    respect to the weights. Matching ``J(x')^T delta`` (:func:`output_functional`) instead of the
    candidate's own ``J(x')^T (softmax(z(x')) - y)`` keeps the candidate's confidence out of
    the objective: on a trained network the softmax saturates and its direction flips between
    runner-up classes as the candidate moves, and the client's float32 ``1 - p`` of a confident
    image is rounded (``docs/models.md``, "Do trained networks leak?"). Valid for a gradient of
    one image with a biased classifier layer; ``mode``: ``model`` (never), ``observed`` (refuse
    where invalid), ``auto`` (where valid). Returns ``(delta or None, note)``."""
    if mode == "model":
        return None, ""
    reason = None
    if update.kind != "gradient":
        reason = "the update is not a gradient"
    elif batch != 1:
        reason = f"the batch holds {batch} images (the bias gradient is their mean)"
    elif head is None or not head.has_bias or head.param("bias") not in update.tensors:
        reason = "no biased classifier layer's gradient in the update"
    if reason is not None:
        if mode == "observed":
            raise AttackNotApplicable(f"output_gradient='observed': {reason}",
                                      condition="a gradient of one image with a biased classifier layer")
        return None, ""
    return update.tensors[head.param("bias")].detach(), "output gradient observed (classifier bias gradient)"


def output_functional(model: nn.Module, buffers: Mapping[str, torch.Tensor], x: torch.Tensor, delta: torch.Tensor):
    """``params -> <delta, model(x)>``: its weight gradient is ``J(x)^T delta``, the client's
    gradient when ``delta`` is the client's output gradient (:func:`observed_output_gradient`)."""

    def value(params):
        return (forward(model, params, buffers, x).reshape(-1) * delta.reshape(-1)).sum()

    return value
