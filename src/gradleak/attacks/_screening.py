"""Restart screening: every restart runs the first ``screen`` iterations of the full schedule,
and only the one with the lowest matching loss runs on to the end.

Why: on trained networks the matching objective has poor basins that a start falls into early
and never leaves (a flat image reconstructed as high-contrast stripes, with a matching loss ten
times the good basins'), and which start does is visible within a few hundred iterations
(``benchmarks/trained_restarts.py``: on the tuning images, the start with the lowest loss at
iteration 200 was the start with the lowest final loss in every case measured; docs/models.md).
Restarts chosen by their matching loss are Inverting Gradients' own remedy (Geiping et al.
2020 run 8-32 of them to the end); screening keeps their choice at a fraction of their cost:
``R x screen + iterations`` iterations instead of ``R x iterations``.

Condition: independent restarts (``group == 0``); a restart's start depends only on its number
and the seed, so the chosen one, run again from its start, follows the trajectory it was on
(exactly on the CPU; up to float reassociation where the screen ran it batched under vmap).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._engine import run_group


@dataclass
class Screening:
    chosen: int                 # the restart that runs to the end
    losses: dict[int, float]    # each restart's lowest matching loss within the screen
    note: str
    runs: list                  # the screened runs (their results, when Ctrl-C cut the screen short)
    interrupted: bool = False


def screen_restarts(attack, problem) -> Screening:
    """Run every restart of ``problem`` for ``attack.config.screen`` iterations; the lowest loss wins."""
    cfg, update = attack.config, problem.update
    losses: dict[int, float] = {}
    screened: list = []
    for group in problem.groups:
        runs = run_group(attack, problem.objective, group, problem.shape, problem.classes, problem.labels is None,
                         problem.bounds, problem.spec, update.loss, vectorized=problem.batched,
                         stop_after=cfg.screen)
        screened += runs
        losses.update({run.restart: run.loss for run in runs if not run.consensus})
        if runs[-1].interrupted:   # Ctrl-C: the caller keeps the best screened iterate
            return Screening(-1, losses, "interrupted while screening the restarts", screened, True)
    finite = {r: v for r, v in losses.items() if v == v and abs(v) != float("inf")}
    chosen = min(finite, key=finite.__getitem__) if finite else min(losses)
    shown = ", ".join(f"{r}: {v:.4g}" for r, v in sorted(losses.items()))
    return Screening(chosen, losses, f"restarts screened for {cfg.screen} iterations (lowest matching loss: "
                                     f"{shown}); restart {chosen} ran to the end", screened)
