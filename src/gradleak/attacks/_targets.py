"""Several independent updates attacked in one batched computation.

An audit attacks the images of a data set one update each; a round has many clients. When
updates come from the same model at the same weights, with the same shapes, protocol and
loss, their matching problems differ only in their data (the observed gradient or delta and
the labels). Stacked as the slots of one ``torch.func.vmap`` (targets x restarts), they run
together in fewer, larger kernels, and each slot is optimised as it would be alone: Adam,
SGD and the box constraint act element-wise, the step schedule is shared, and each slot
starts from the candidate its restart number seeds. The reconstructions equal those of one
update at a time up to float rounding (vmap's kernels sum in another order than plain
autograd's; tests check the images to 1e-4).

Conditions, else the updates run one after the other (``batched_targets="loop"`` forces
that): Adam or SGD (not L-BFGS, whose line search couples the slots); no BatchNorm, no
BatchNorm prior and no dropout in train mode (per-sample statistics or randomness under
vmap); no group consistency; no stopping rule that acts on the whole group (``tol``,
``patience``, ``time_budget``); restarts batched too when there are several; a model under
1M parameters (``benchmarks/restarts.py``: beyond it vmap stops paying); at most
:data:`MAX_SLOTS` samples (slots x batch size) per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..functional import has_batch_norm
from ..update import SharedUpdate
from ._engine import run_group
from .base import Hooks, Reconstruction, check_monitors

__all__ = ["MAX_SLOTS", "batching_refused", "target_chunks", "reconstruct_targets"]

MAX_SLOTS = 32  # samples optimised in one vmap: benchmarks/throughput.py (LeNet: ~flat per slot beyond)


def batching_refused(attack) -> str | None:
    """Why ``attack`` (a GradientMatching) cannot batch targets, or None when it can."""
    cfg, model = attack.config, attack.model
    if cfg.batched_targets == "loop":
        return "batched_targets='loop'"
    if cfg.optimizer == "lbfgs":
        return "L-BFGS couples the slots through its line search"
    if has_batch_norm(model) or cfg.bn > 0:
        return "BatchNorm"
    if cfg.group > 0:
        return "group consistency ties the restarts of one update"
    if cfg.tol is not None or cfg.patience is not None or cfg.time_budget is not None:
        return "a stopping rule (tol, patience, time_budget) acts on the whole group"
    if cfg.smooth_relu:
        return f"smooth_relu={cfg.smooth_relu:g} (two passes per update)"
    if cfg.screen is not None:
        return "restart screening (screen=...)"
    if cfg.mixture != "mean":
        return f"mixture={cfg.mixture!r} (weights fitted with plain autograd)"
    if cfg.restarts > 1 and cfg.batched_restarts == "loop":
        return "batched_restarts='loop'"
    if sum(p.numel() for p in model.parameters()) >= 1_000_000:
        return "a model of 1M parameters or more"
    return None


def _signature(update: SharedUpdate) -> tuple:
    """What must agree for two updates to share one vmap (weights compared separately)."""
    return (update.kind, update.loss, update.input_shape, update.batch_size, update.mode, update.local_lr,
            update.local_steps, update.local_batch_size, update.data_spec, update.labels is None,
            tuple((n, tuple(t.shape), t.dtype) for n, t in update.tensors.items()), update.weights is None)


def _same_weights(a: SharedUpdate, b: SharedUpdate) -> bool:
    if a.weights is None or a.weights is b.weights:
        return True
    return a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)


def target_chunks(attack, updates: Sequence[SharedUpdate]) -> list[list[int]]:
    """Runs of consecutive indices of ``updates`` that can share one vmap (singletons where
    batching is refused), each of at most :data:`MAX_SLOTS` samples over all restarts."""
    if batching_refused(attack) is not None or _dropout_in_train_mode(attack.model, updates):
        return [[k] for k in range(len(updates))]
    restarts = attack.config.restarts
    chunks: list[list[int]] = []
    for k, update in enumerate(updates):
        if chunks:
            first = updates[chunks[-1][0]]
            samples = (len(chunks[-1]) + 1) * restarts * (update.batch_size or attack.config.batch_size or 1)
            if (samples <= MAX_SLOTS and _signature(update) == _signature(first) and _same_weights(first, update)):
                chunks[-1].append(k)
                continue
        chunks.append([k])
    return chunks


def _dropout_in_train_mode(model: nn.Module, updates: Sequence[SharedUpdate]) -> bool:
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    return dropout and any(u.mode == "train" or (u.mode is None and model.training) for u in updates)


def _stack(datas: list[dict[str, Any]], restarts: int) -> dict[str, Any]:
    """Per-slot data stacked target-major (slot = target * restarts + restart)."""
    def stacked(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v for v in values for _ in range(restarts)])

    out: dict[str, Any] = {"target": {n: stacked([d["target"][n] for d in datas]) for n in datas[0]["target"]}}
    for key in ("labels", "output_gradient", "features", "feature_map"):
        if key in datas[0]:
            out[key] = stacked([d[key] for d in datas])
    return out


def _attack_chunk(attack, updates: list[SharedUpdate], monitors: list[Callable | None],
                  progress: Callable | None) -> list[Reconstruction]:
    """One vmap over the chunk's targets x restarts; one Reconstruction per update."""
    for update in updates:
        update.validate_for(attack.model)
    observed = [attack.threat.observe(update) for update in updates]
    restarts = attack.config.restarts
    was_training = attack.model.training
    if updates[0].mode is not None:
        attack.model.train(updates[0].mode == "train")
    attack._hooks = Hooks(None, progress)
    try:
        problems = [attack._problem(update) for update in observed]
        first = problems[0]
        runs = run_group(attack, first.objective, [r for _ in problems for r in range(restarts)], first.shape,
                         first.classes, first.labels is None, first.bounds, first.spec, first.update.loss,
                         vectorized=True, data=_stack([p.data for p in problems], restarts),
                         monitors=[m for m in monitors for _ in range(restarts)])
        for t in range(1, len(problems)):  # the group's notes (stop, Ctrl-C) concern every target
            runs[t * restarts].notes = list(runs[0].notes)
        results = [attack._result(p, runs[t * restarts:(t + 1) * restarts]) for t, p in enumerate(problems)]
    finally:
        attack._hooks = Hooks()
        attack.model.train(was_training)
    note = (f"attacked together with {len(updates) - 1} other update(s): one vmap over "
            f"{len(updates)} targets x {restarts} restart(s)")
    for result in results:
        result.attack = attack.name
        result.config = {**attack.options(), **result.config}
        result.notes.append(note)
    return results


def reconstruct_targets(attack, updates: list[SharedUpdate], monitors: Sequence[Callable | None] | None,
                        progress: Callable | None) -> Iterator[Reconstruction]:
    """``attack.reconstruct`` of each update in order, chunks of them batched (see the module)."""
    check_monitors(monitors, updates)
    monitors = [None] * len(updates) if monitors is None else list(monitors)
    for chunk in target_chunks(attack, updates):
        if len(chunk) == 1:
            results = [attack.reconstruct(updates[chunk[0]], monitor=monitors[chunk[0]], progress=progress)]
        else:
            results = _attack_chunk(attack, [updates[k] for k in chunk], [monitors[k] for k in chunk], progress)
        yield from results
        if any(result.interrupted for result in results):  # Ctrl-C: the chunk's best iterates, then no more
            return
