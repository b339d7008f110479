"""The flat start of a gradient-matching attack on images (``init="flat"`` or ``"randn+flat"``).

A random start leaves a trained network's matching objective in a basin far from a plain
image: the objective is sharp around the truth (noise of 30 dB costs 1 - cos ~0.1 on the
trained faces networks, ~1e-4 on the untrained one), and a signed step from noise builds
texture the image does not have. A uniform image at the right brightness starts much nearer,
and the objective itself finds that brightness: scanned over flat images, the matching loss is
lowest at the true mean level of a plain crop (within 0.003-0.063 of it on the held-out faces;
docs/models.md). The scan needs no ground truth, costs a few dozen gradient evaluations, and a
start that does not suit the image (a face) ends with a higher matching loss than a random one,
so with ``randn+flat`` the attacker keeps whichever explains the update better.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["FLAT_INITS", "flat_start"]

FLAT_INITS = ("flat", "randn+flat")   # the values of ``init`` that start (some) restarts flat

COARSE = 21   # levels 0, 0.05, ..., 1 (pixel scale)
FINE = 0.01   # then +-0.05 around the best in steps of 0.01
PASSES = 4    # coordinate passes at most, per grid


def _levels_image(levels: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return low + levels[..., None, None] * (high - low)


def _best(score: Callable[[torch.Tensor], float], trials, low: torch.Tensor, high: torch.Tensor,
          current: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, float]:
    """The trial levels with the lowest finite score, or ``current`` when none is lower."""
    levels, value = current
    for trial in trials:
        loss = score(_levels_image(trial, low, high))
        if math.isfinite(loss) and loss < value:
            levels, value = trial, loss
    return levels, value


def _set(levels: torch.Tensor, where, value) -> torch.Tensor:
    trial = levels.clone()
    trial[where] = value
    return trial


def flat_start(score: Callable[[torch.Tensor], float], low: torch.Tensor, high: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The uniform image (one level per image and channel) with the lowest matching loss.

    ``score(x)``: the matching loss of candidate ``x`` (B, C, H, W); ``low``/``high``: the model
    inputs of pixel values 0 and 1, broadcast to that shape. One level common to everything is
    scanned over ``COARSE`` values in [0, 1]; then, when there are several images or channels,
    each (image, channel) level in turn over the same values; last, a shift of all levels together
    and each level alone within +-0.05 in steps of ``FINE`` (the loss valley often runs along the
    common brightness, which single levels cannot follow). Passes repeat until one changes
    nothing (at most ``PASSES`` per grid). Returns the candidate, the levels (B, C, pixel scale)
    and its loss (inf when no level gave a finite loss)."""
    batch, channels = low.shape[:2]
    coarse = torch.linspace(0, 1, COARSE, dtype=low.dtype)
    steps = torch.arange(-5, 6, dtype=low.dtype) * FINE
    full = torch.full((batch, channels), 0.5, dtype=low.dtype, device=low.device)
    state = _best(score, [torch.full_like(full, float(v)) for v in coarse], low, high, (full, math.inf))
    coordinates = [(b, c) for b in range(batch) for c in range(channels)] if batch * channels > 1 else []

    def coarse_pass(state):
        for where in coordinates:
            state = _best(score, [_set(state[0], where, v) for v in coarse], low, high, state)
        return state

    def fine_pass(state):
        state = _best(score, [(state[0] + d).clamp(0, 1) for d in steps], low, high, state)
        for where in coordinates:
            state = _best(score, [_set(state[0], where, (state[0][where] + d).clamp(0, 1)) for d in steps],
                          low, high, state)
        return state

    for one_pass in (coarse_pass, fine_pass):
        for _ in range(PASSES):
            before = state[0]
            state = one_pass(state)
            if torch.equal(before, state[0]):
                break
    levels, value = state
    return _levels_image(levels, low, high), levels, value
