"""Which audit cells run together: groups of cells, planned once over the whole grid.

Two kinds of group (each runs in one process, one worker task or one Ray task):

- **cells that share their client updates** (:func:`cell_groups`: one model, defense entry
  and batch size, every attack on it): the updates are simulated once;
- **cells attacked together** (:func:`plan_groups`): one gradient-matching attack on one model
  at one batch size, under different defense entries. Their matching problems differ only in
  the updates the server received, so ``GradientMatching.reconstruct_many`` stacks the updates
  of all of them as the targets of one ``torch.func.vmap`` (``attacks/_targets.py``): the
  same reconstructions up to float rounding, several times more images per minute (a vmap
  of 32 LeNet samples costs about a fifth per sample of one image alone;
  ``benchmarks/throughput.py``). A group holds at most ``MAX_SLOTS`` samples (cells x
  images x restarts) and only cells whose entries keep the client's protocol (a defense that
  changes it, like FedAvg local steps or secure aggregation, sends updates of another shape
  or cost: those cells stay alone, so the groups stay balanced across workers).

Planned over the whole grid, never over what is left to compute: an audit resumed after an
interruption batches each cell with the same others as an uninterrupted one, so it gives
the same numbers. A group with a stored cell among missing ones is computed whole; only the
missing cells are stored. Groups of cells attacked together come first (the longest tasks
start first: both cores stay busy to the end).
"""

from __future__ import annotations

from typing import Any

from ..defenses.base import Defense
from ..errors import GradleakError

__all__ = ["cell_groups", "plan_groups", "cell_model"]


def cell_model(spec, config, context: dict[str, Any]):
    """The built model of a cell (``ModelSpec.build``): the audit's seed, dtype and device, the
    weights ``train:`` gave it, the attacked images' shape and classes."""
    return spec.model.spec(seed=config.seed, dtype=config.dtype, device=str(context["device"]),
                           weights=context["weights"].get(spec.model.label)
                           ).build(tuple(context["images"].shape[1:]), len(context["classes"]))


def cell_groups(specs: list, indices: list[int]) -> list[list[int]]:
    """``indices`` (into ``specs``) grouped by the client updates their cells share (model,
    defense entry, batch size), in grid order: each group is independent of the others."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((specs[i].model.label, specs[i].defense_index, specs[i].batch_size), []).append(i)
    return list(groups.values())


def _keeps_protocol(stack: list[Defense]) -> bool:
    """No entry of ``stack`` changes what the client runs (``configure``) or what the server sees summed."""
    return all(d.stage != "aggregate" and type(d).configure is Defense.configure for d in stack)


def _cells_per_group(config, spec, context: dict[str, Any]) -> int:
    """How many cells of ``spec``'s (model, attack) fit one batched group: 0 when its attack
    cannot batch targets (not gradient matching, a malicious server, or a configuration
    ``attacks/_targets.batching_refused`` names)."""
    from ..attacks._targets import MAX_SLOTS, batching_refused
    from ..attacks.malicious import MaliciousAttack
    from ..attacks.optimization import GradientMatching
    from ..pipeline import make_attack
    from ..threat import ThreatModel

    try:
        attack = make_attack(spec.attack.name, cell_model(spec, config, context).module, ThreatModel(**config.threat),
                             dict(spec.attack.options))
    except GradleakError:
        return 0  # the cell names its error when it runs alone
    if not isinstance(attack, GradientMatching) or isinstance(attack, MaliciousAttack) or batching_refused(attack):
        return 0
    return MAX_SLOTS // (context["images"].shape[0] * attack.config.restarts)


def plan_groups(config, specs: list, stacks: list[list[Defense]], todo: list[int], context: dict[str, Any]
                ) -> list[list[int]]:
    """The groups that compute the cells ``todo`` (indices into ``specs``): cells attacked
    together first (each may also hold stored cells: computed again, not stored), then the
    other cells grouped by the updates they share (:func:`cell_groups`)."""
    if not todo:  # everything stored: no model is built to plan nothing
        return []
    sizes: dict[tuple, int] = {}
    runs: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        if not _keeps_protocol(stacks[spec.defense_index]):
            continue
        key = (spec.model.label, spec.batch_size, spec.attack.name, repr(spec.attack.options))
        if key not in sizes:
            sizes[key] = _cells_per_group(config, spec, context)
        if sizes[key] > 1:
            runs.setdefault(key, []).append(i)
    wanted, together = set(todo), []
    for key, cells in runs.items():
        chunks = [cells[k:k + sizes[key]] for k in range(0, len(cells), sizes[key])]
        together += [chunk for chunk in chunks if len(chunk) > 1 and wanted & set(chunk)]
    grouped = {i for chunk in together for i in chunk}
    return together + cell_groups(specs, [i for i in todo if i not in grouped])
