"""Each image's share of a FedSGD update: which images the update actually carries.

The FedSGD gradient of a batch's mean loss is the mean of its images' own gradients,
``u = (1/B) sum_i g_i``, and each ``g_i`` scales with the image's error at the output (for
cross-entropy ``dL/dz_i = p_i - onehot(y_i)``). A trained network that classifies an image with
confidence ``p`` leaves it a gradient of order ``1 - p``, so the batch's update is dominated by
its least confidently classified images: Wen et al. 2022 ("Fishing for User Data in Large-Batch
Federated Learning via Gradient Magnification", ICML) build a malicious attack on exactly that,
and ``docs/models.md`` measures it on honest trained networks (ConvNet-16 on the faces, batch 4:
one image holds more than 99.9 % of the per-image gradients' squared norm; untrained: 24-25 %
each).

The share of image ``i`` is ``s_i = ||g_i||^2 / sum_j ||g_j||^2`` (float64 sums, ``sum_i s_i = 1``).
An image with a small share moves the update, and so a gradient-matching objective, by little:
the update hardly constrains it, and no attack that only matches the update should be expected to
recover it. Computed on a reconstruction, the shares need no ground truth: the server sees which
of its reconstructed images explain the update and which are filler. Computed on the true batch
(a simulation), they say which images were in reach.

Valid when the update is the gradient of a mean of per-image losses: FedSGD with no coupling
between the batch's images. Train-mode BatchNorm normalises each image with the batch's
statistics (no per-image gradient exists) and a FedAvg delta of several local steps is not a sum
of per-image terms: both are refused (:class:`~gradleak.errors.AttackNotApplicable`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import grad

from .errors import AttackNotApplicable
from .functional import batch_norm_in_train_mode, task_loss

__all__ = ["per_image_shares", "carried", "mixture_parts", "parts_text", "CARRIED_SHARE", "MAX_SHARE_IMAGES", "MIXTURE_PARTS_NOTE"]

CARRIED_SHARE = 0.01      # an image holding at least 1 % of the per-image gradient energy is "carried"
MAX_SHARE_IMAGES = 256    # one backward pass per image: larger batches are not split (the call refuses)
# how a gradient-matching run with mixture="fitted" notes each reconstructed image's part of the fitted update
MIXTURE_PARTS_NOTE = "mixture fitted to the update (mixture='fitted'), each reconstructed image's part: "


def per_image_shares(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                     loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``s_i = ||g_i||^2 / sum_j ||g_j||^2`` for the images (or sequences) ``x`` with targets ``y``,
    where ``g_i`` is the gradient of image ``i``'s own loss with respect to ``params`` (float64,
    one per image, summing to 1). ``model`` must be in the mode the client ran (eval-mode
    BatchNorm); raises AttackNotApplicable where the images are coupled or carry no gradient."""
    n = int(x.shape[0])
    if n > MAX_SHARE_IMAGES:
        raise AttackNotApplicable(f"per-image shares: {n} images, more than the {MAX_SHARE_IMAGES} computed one "
                                  f"by one", condition=f"at most {MAX_SHARE_IMAGES} images")
    if n > 1 and batch_norm_in_train_mode(model):
        raise AttackNotApplicable("per-image shares: train-mode BatchNorm normalises each image with the batch's "
                                  "statistics, so no image has a gradient of its own",
                                  condition="no train-mode BatchNorm")
    energy = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        g = grad(task_loss(model, buffers, loss_fn, x[i:i + 1], y[i:i + 1]))(dict(params))
        energy[i] = sum(float(v.detach().double().pow(2).sum()) for v in g.values())
    total = float(energy.sum())
    if not total > 0.0 or not torch.isfinite(energy).all():
        raise AttackNotApplicable(f"per-image shares: the images' gradients have squared norm {total:.3g} in all",
                                  condition="a finite, non-zero gradient")
    return energy / total


def carried(shares: torch.Tensor | tuple[float, ...], threshold: float = CARRIED_SHARE) -> int:
    """How many images hold at least ``threshold`` of the per-image gradient energy."""
    return int((torch.as_tensor(shares, dtype=torch.float64) >= threshold).sum())


def mixture_parts(notes: list[str], n: int | None) -> list[float] | None:
    """Each of ``n`` reconstructed images' part of its update's fitted mixture, read from a reconstruction's
    notes (one note per update, in order; ``MatchingConfig(mixture="fitted")``); None unless the notes give
    exactly ``n`` (None: one or more) finite parts in [0, 1] (a hand-edited or partial record gives none)."""
    parts: list[float] = []
    for note in notes:
        if isinstance(note, str) and MIXTURE_PARTS_NOTE in note:
            try:
                parts += [float(v) for v in note.split(MIXTURE_PARTS_NOTE, 1)[1].split(", ")]
            except ValueError:
                return None
    if not parts or (n is not None and len(parts) != n) or not all(0.0 <= v <= 1.0 for v in parts):
        return None
    return parts


def parts_text(parts: list[float]) -> str:
    """``3 of 4 images hold at least 1 % of the fitted mixture``: how many reconstructed images explain the update."""
    return (f"{carried(parts)} of {len(parts)} images hold at least {100 * CARRIED_SHARE:g} % of the fitted mixture "
            f"(mixture='fitted')")
