"""LAMP's search over token orders (Balunović et al., "LAMP: Extracting Text from Gradients with
Language Model Priors", NeurIPS 2022, §4): the choice of the starting embeddings among random
candidates, and the discrete step that alternates with the continuous optimisation.

Both act on one slot's continuous embeddings ``x`` (B, n, d) and score with ``score(x)``, the
quantity the caller chooses (LAMP: the matching loss of the embeddings, plus ``lm_weight`` x the
language-model prior's NLL of the tokens they project to). Proposals are made and scored one at
a time, so memory does not grow with their number.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

__all__ = ["TRANSFORMATIONS", "transformation", "DiscreteOutcome", "discrete_step", "choose_start"]

TRANSFORMATIONS = ("swap", "move-token", "move-span", "move-prefix")


def _draw(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def transformation(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``n`` positions of one of LAMP's kinds (a row ``x[perm]`` is the
    transformed sequence): ``swap`` two tokens, ``move-token`` one token elsewhere, ``move-span``
    a contiguous span elsewhere, ``move-prefix`` a prefix to the end."""
    order = list(range(n))
    if n < 2:
        return torch.tensor(order)
    if kind == "swap":
        i = _draw(generator, 0, n)
        j = (i + _draw(generator, 1, n)) % n                    # j != i
        order[i], order[j] = order[j], order[i]
    elif kind == "move-token":
        i = _draw(generator, 0, n)
        j = (i + _draw(generator, 1, n)) % n
        order.insert(j, order.pop(i))
    elif kind == "move-span":
        b = _draw(generator, 0, n)
        e = min(_draw(generator, b + 1, n + 1), n - 1 if b == 0 else n)   # [b, e) leaves a token out
        rest = order[:b] + order[e:]
        p = _draw(generator, 0, len(rest))
        p += p >= b                                             # never back where it was
        order = rest[:p] + order[b:e] + rest[p:]
    elif kind == "move-prefix":
        i = _draw(generator, 1, n)
        order = order[i:] + order[:i]
    else:
        raise ValueError(f"unknown transformation {kind!r}")
    return torch.tensor(order)


@dataclass
class DiscreteOutcome:
    """What one discrete step did: the score before and after, and the transformations kept."""

    before: float
    after: float
    kept: list[str]


def discrete_step(score: Callable[[torch.Tensor], float], x: torch.Tensor, proposals: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, DiscreteOutcome]:
    """LAMP's discrete step on ``x`` (B, n, d): for each sequence in turn, ``proposals`` candidates
    (the sequence as it is, then transformations of its continuous embeddings, the kinds in turn)
    are scored with the other sequences as they stand, and the lowest score is kept (the
    sequence as it is on ties). The score never increases."""
    x = x.detach().clone()
    before = current = score(x)
    kept = []
    for b in range(x.shape[0]):
        best, best_kind = None, None
        for p in range(1, proposals):
            kind = TRANSFORMATIONS[(p - 1) % len(TRANSFORMATIONS)]
            candidate = x.clone()
            candidate[b] = x[b, transformation(kind, x.shape[1], generator).to(x.device)]
            value = score(candidate)
            if value < current:
                best, best_kind, current = candidate, kind, value
        if best is not None:
            x = best
            kept.append(best_kind)
    return x, DiscreteOutcome(before, current, kept)


def choose_start(score: Callable[[torch.Tensor], float], first: torch.Tensor, candidates: int,
                 generator: torch.Generator, scale: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """LAMP's initialisation: ``first`` (B, n, d) and ``candidates - 1`` standard normal draws, each
    scaled by ``scale``, the one of lowest score kept; then ``candidates - 1`` random orders of each
    sequence of it, kept when they score lower. Returns the start and its score."""
    best = scale(first.detach().clone())
    best_score = score(best)
    for _ in range(candidates - 1):
        candidate = scale(torch.randn(first.shape, generator=generator, dtype=first.dtype).to(first.device))
        value = score(candidate)
        if value < best_score:
            best, best_score = candidate, value
    for _ in range(candidates - 1):
        order = torch.rand(first.shape[:2], generator=generator).argsort(dim=1).to(first.device)
        candidate = torch.gather(best, 1, order[..., None].expand_as(best))
        value = score(candidate)
        if value < best_score:
            best, best_score = candidate, value
    return best, best_score
