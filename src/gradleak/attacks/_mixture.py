"""Fitted mixture weights for a batch's candidates (``MatchingConfig(mixture="fitted")``).

A FedSGD update is the mean of its images' own gradients, ``u = (1/B) sum_i g_i(x_i)``, and on a
trained network each ``g_i`` scales with the image's error at the output, ``1 - p_i``, which is
exponentially sensitive to the image: one image holds most of a batch's update
(:mod:`gradleak.shares`; ``docs/models.md`` measures 73-89 % median on trained digit networks).
Matching ``(1/B) sum_i g_i(x'_i)`` then asks every candidate to reproduce its image's confidence
before its gradient's direction can count, and candidates that are classified less confidently
than their images drown the rest.

With ``mixture="fitted"`` the simulated update is ``sum_i w_i g_i(x'_i)`` with nonnegative weights
``w`` fitted to the observed update at every evaluation: the nonnegative least-squares
solution of ``min_w ||G w - u||`` over the matched entries, ``G`` the candidates' per-image
gradients (fitted on columns scaled to unit norm, so that the fit does not depend on their
magnitudes; the distance then compares ``G w`` with ``u`` at that scale, which the cosine ignores
and the squared distance needs). The weights are held fixed while the input gradient is taken: at
the least-squares optimum the derivative through ``w`` vanishes where no constraint is active
(variable projection, Golub and Pereyra 1973, SIAM J. Numer. Anal. 10(2)). The true batch is
still a zero of the objective (``w_i = 1/B`` at the client's own ``g_i``), so the relaxation
loses no solution; it drops the requirement that each candidate's confidence match its image's.
What it costs: one first-order backward pass per candidate image at every evaluation.

Valid for a FedSGD gradient of a mean of per-image losses with no coupling between the images
(no train-mode BatchNorm) and for batches of 2 or more; refused otherwise by the engine. Each
candidate's part of the fitted mixture says, without ground truth, how much of the observed
update each reconstructed image explains (the run's notes list them).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import AttackNotApplicable
from ..functional import batch_norm_in_train_mode, forward
from ..update import SharedUpdate

__all__ = ["check_mixture", "per_image_gradients", "nonnegative_least_squares", "fitted_weights", "mixture_loss"]


def check_mixture(model: nn.Module, update: SharedUpdate) -> None:
    """Refuse, naming the condition, an update whose images have no gradients of their own."""
    if update.kind != "gradient":
        raise AttackNotApplicable("mixture='fitted': a FedAvg delta of local steps is not a sum of per-image "
                                  "gradients", condition="a FedSGD gradient")
    if batch_norm_in_train_mode(model):
        raise AttackNotApplicable("mixture='fitted': train-mode BatchNorm normalises each image with the batch's "
                                  "statistics, so no image has a gradient of its own",
                                  condition="no train-mode BatchNorm")


def per_image_gradients(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                        loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """``G``: column ``i`` is image ``i``'s own gradient over the entries ``names`` (float64, detached;
    ``P x B``). One first-order backward pass per image."""
    leaves = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    wanted = [leaves[n] for n in names]
    columns = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            loss = loss_fn(forward(model, leaves, buffers, x[i:i + 1].detach()), y[i:i + 1].detach())
            g = torch.autograd.grad(loss, wanted, allow_unused=True, materialize_grads=True)
            columns.append(torch.cat([t.reshape(-1) for t in g]).double())
    return torch.stack(columns, 1)


def nonnegative_least_squares(gram: torch.Tensor, rhs: torch.Tensor, max_steps: int | None = None) -> torch.Tensor:
    """``argmin_{w >= 0} w^T K w / 2 - b^T w`` for a symmetric positive semidefinite ``K`` (``gram``)
    and ``b`` (``rhs``): the normal equations of ``min_{w >= 0} ||G w - u||`` with ``K = G^T G``,
    ``b = G^T u``. Lawson and Hanson's active-set method (1974, ch. 23), float64."""
    K, b = gram.double(), rhs.double()
    n = b.shape[0]
    K = K + torch.eye(n, dtype=K.dtype) * (1e-12 * float(K.diagonal().abs().max().clamp_min(1e-300)))
    w = torch.zeros(n, dtype=K.dtype)
    free = torch.zeros(n, dtype=torch.bool)
    tol = 1e-12 * float(b.abs().max().clamp_min(1e-300))
    for _ in range(max_steps or 3 * n + 3):
        slope = b - K @ w
        candidates = (~free) & (slope > tol)
        if not bool(candidates.any()):
            break
        free[int(torch.where(candidates, slope, torch.full_like(slope, -torch.inf)).argmax())] = True
        while True:
            s = torch.zeros_like(w)
            idx = free.nonzero().reshape(-1)
            s[idx] = torch.linalg.solve(K[idx][:, idx], b[idx])
            if bool((s[idx] > 0).all()):
                w = s
                break
            bad = idx[s[idx] <= 0]
            alpha = float((w[bad] / (w[bad] - s[bad])).min())
            w = w + alpha * (s - w)
            free &= w > 0
            w = torch.where(free, w, torch.zeros_like(w))
    return w


def fitted_weights(per_image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, explained)``: the nonnegative weights ``w`` on the candidates' per-image gradients (columns
    of ``per_image``) that best explain ``target`` at the least-squares scale (fitted on unit-norm
    columns; a unit weight below ``1e-9`` of the largest is set to 0, so that rounding on a
    candidate with a vanishing gradient is not amplified by ``1 / ||g_i||``), and each candidate's
    part of the fitted mixture, ``w_i ||g_i|| / sum_j w_j ||g_j||``. Where no positive combination
    explains any of ``target``: the client's mean, ``w_i = 1/B`` and equal parts."""
    n = per_image.shape[1]
    norms = per_image.norm(dim=0)
    alive = norms > 0
    unit = torch.zeros(n, dtype=torch.float64)
    if bool(alive.any()):
        columns = per_image[:, alive] / norms[alive]
        unit[alive] = nonnegative_least_squares(columns.T @ columns, columns.T @ target.double())
    unit = torch.where(unit >= 1e-9 * float(unit.max()), unit, torch.zeros_like(unit))
    total = float(unit.sum())
    if not total > 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)
    weights = torch.zeros(n, dtype=torch.float64)
    weights[alive] = unit[alive] / norms[alive]
    return weights, unit / total


def mixture_loss(model: nn.Module, buffers: Mapping[str, torch.Tensor], loss_fn: Callable, x: torch.Tensor,
                 y: torch.Tensor, weights: torch.Tensor) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """``params -> sum_i w_i loss(x_i, y_i)``: its gradient is ``sum_i w_i g_i`` (``w_i = 1/B``: the
    client's mean loss, exactly)."""
    def loss(params):
        logits = forward(model, params, buffers, x)
        w = weights.to(logits.dtype)
        return sum(w[i] * loss_fn(logits[i:i + 1], y[i:i + 1]) for i in range(x.shape[0]))
    return loss
