"""One update prepared for the gradient-matching loop, and the note on the candidate it returns
(:class:`gradleak.attacks.optimization.GradientMatching`'s bookkeeping, apart from its method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data.spec import DataSpec
from ..update import SharedUpdate

__all__ = ["Problem", "target_data", "choice_note"]


@dataclass
class Problem:
    """One update prepared for the loop (see ``GradientMatching._problem``)."""

    update: SharedUpdate
    objective: Callable
    data: dict[str, Any]              # what the objective matches: {"target": entries, "labels": labels}
    labels: torch.Tensor | None       # None: soft labels optimised
    label_note: str
    names: list[str]
    params: dict[str, torch.Tensor]
    bn: Any
    shape: tuple[int, ...]
    classes: int
    bounds: tuple[torch.Tensor, torch.Tensor]
    spec: DataSpec
    batched: bool                     # restarts under vmap
    groups: list[list[int]]


def target_data(update: SharedUpdate, names: list[str], dtype, labels) -> dict[str, Any]:
    data: dict[str, Any] = {"target": {n: update.tensors[n].to(dtype) for n in names}}
    if labels is not None:
        data["labels"] = labels
    return data


def choice_note(cfg, runs, best, batched: bool) -> str:
    """Which candidate the attack returns and why (the lowest matching loss wins)."""
    how = " (batched with vmap)" if batched else ""
    if not any(run.consensus for run in runs):
        if cfg.screen is not None and len(runs) == 1 and cfg.restarts > 1:   # the others stopped at the screen
            return (f"restart {best.restart} (the lowest loss of {cfg.restarts} after {cfg.screen} iterations): "
                    f"matching loss {best.loss:.4g} after {best.iterations} iteration(s){how}")
        return (f"best of {cfg.restarts} restart(s): restart {best.restart}, matching loss {best.loss:.4g}"
                f" after {best.iterations} iteration(s){how}")
    restarts = [run for run in runs if not run.consensus]
    top = min(run.loss for run in restarts)
    mean = next(run for run in runs if run.consensus)
    chosen = "the group's consensus" if best.consensus else f"restart {best.restart}"
    return (f"group consistency over {len(restarts)} restarts (weight {cfg.group:g}, {cfg.group_schedule} from "
            f"{cfg.group_start:g} of the iterations): returned {chosen}, the lowest matching loss "
            f"(consensus {mean.loss:.4g}, best restart {top:.4g}) after {best.iterations} iteration(s){how}")
