"""The optimisation loop of :class:`~gradleak.attacks.optimization.GradientMatching`.

One call optimises a group of candidates ("slots") stacked along a leading dimension: the
restarts of one update, or the restarts of several independent updates (targets) at once,
each slot with its own target data (``data``: the shared gradient and labels it matches),
with
``torch.func.vmap`` when the group has several restarts (element-wise optimisers make
the stacked problem exactly R independent ones), plainly when it has one, and one by one
in lockstep where ``vmap`` cannot run (BatchNorm, L-BFGS) but the restarts must move
together: the group-consistency term (``group > 0``, Yin et al. 2021) pulls every restart
towards the group's consensus, and the consensus itself is scored as one more candidate. The loop keeps
the best iterate of every restart (by matching loss), records curves, reports progress,
stops early on ``tol``/``patience``, and turns Ctrl-C into "stop here, keep the best": the
results are marked ``interrupted`` so that the callers stop too (no further restart, update
or audit cell runs, and nothing interrupted is stored as finished).

The engine depends on nothing of :mod:`.optimization` (which imports :func:`run_group`): it
reads the configuration as ``attack.config`` and the hooks as ``attack._hooks``; a group is
evaluated by :mod:`._evaluators` and stepped by :mod:`._steps`. Two methods of
the attack may act on the candidates of the slots ``group`` (their restart numbers), in place:
``attack.initial_candidates(group, objective, data, X, Y)`` once before the first step (LAMP's
choice among random starts) and ``attack.candidate_step(iteration, group, objective, data, X, Y)``
after every step (LAMP's discrete
step, which alternates with the continuous one), writing them under ``torch.no_grad()``; an
attack without them, or whose methods leave the candidates alone, runs exactly as before. The
optimiser's state is kept across a replacement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ._evaluators import Evaluation, evaluator, slot
from ._flat_start import FLAT_INITS, flat_start
from ._steps import _optimizer, _scheduler, _snapshot, _step
from .matching import consensus, group_consistency

__all__ = ["RestartResult", "run_group"]

@dataclass
class RestartResult:
    restart: int
    x: torch.Tensor                 # best candidate, model input space (B, C, H, W)
    y_soft: torch.Tensor | None     # best soft-label logits when labels were optimised
    loss: float
    iterations: int
    history: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False       # Ctrl-C stopped this restart; x is the best iterate up to then
    consensus: bool = False         # x is the group's consensus (pixel-wise mean of its best iterates)


# ------------------------------------------------------------------ initial candidates
def _initial(cfg, restart: int, shape, spec, dtype, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + restart)
    if cfg.init == "randn" or cfg.init in FLAT_INITS:   # flat: replaced by the scan in run_group
        x = torch.randn(shape, generator=generator, dtype=dtype)
    elif cfg.init == "rand":
        x = spec.normalize(torch.rand(shape, generator=generator, dtype=dtype))
    else:
        x = torch.zeros(shape, dtype=dtype)
    return x.to(device)


def _initial_labels(cfg, restart: int, label_shape, dtype) -> torch.Tensor:
    """Soft-label logits of one restart (DLG): standard normal, seeded per restart."""
    return torch.randn(label_shape, generator=torch.Generator().manual_seed(cfg.seed + 7919 * restart), dtype=dtype)


def _candidates(cfg, group: list[int], shape, classes: int, optimize_labels: bool, loss_name: str, spec, dtype,
                device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stacked leaves optimised: inputs ``X`` (R, B, C, H, W) and, when labels are
    optimised, soft-label logits ``Y`` (R, B, classes), or (R, B) for a binary head."""
    X = torch.stack([_initial(cfg, r, shape, spec, dtype, device) for r in group]).requires_grad_(True)
    if not optimize_labels:
        return X, None
    label_shape = (shape[0],) if loss_name == "binary_cross_entropy" else (shape[0], classes)
    Y = torch.stack([_initial_labels(cfg, r, label_shape, dtype) for r in group]).to(device).requires_grad_(True)
    return X, Y


def _flat_starts(cfg, objective: Callable, group: list[int], data: Any, X: torch.Tensor, Y: torch.Tensor | None,
                 bounds) -> list[str]:
    """``init="flat"`` (every slot) or ``"randn+flat"`` (the last restart): the slot starts at the
    uniform image with the lowest matching loss (:func:`._flat_start.flat_start`), in place."""
    low, high = (bound.expand(X.shape[1:]) for bound in bounds)
    notes = []
    for k, restart in enumerate(group):
        if cfg.init != "flat" and restart != cfg.restarts - 1:
            continue
        y = None if Y is None else Y[k].detach()

        def score(x, y=y, target=slot(data, k)):
            return float(objective(x, y, target, functional=False).detach())

        x, levels, value = flat_start(score, low, high)
        with torch.no_grad():
            X[k].copy_(x)
        shown = ", ".join(f"{v:.2f}" for v in levels.reshape(-1)[:8].tolist()) + (" ..." if levels.numel() > 8 else "")
        notes.append(f"restart {restart}: flat start at pixel level(s) {shown} (matching loss {value:.4g})")
    return notes


# ------------------------------------------------------------------ group consistency
def group_weight(cfg, iteration: int) -> float:
    """The weight of the group-consistency term at ``iteration``: 0 before ``group_start``
    (a fraction of the iterations), then ``group`` (``constant``) or a linear ramp from 0 to
    ``group`` at the last iteration (``linear``)."""
    start = cfg.group_start * cfg.iterations
    if cfg.group == 0 or iteration < start:
        return 0.0
    if cfg.group_schedule == "linear":
        return cfg.group * (iteration - start + 1) / max(cfg.iterations - start, 1)
    return cfg.group


class _GroupConsistency:
    """Wraps an evaluator: adds ``group_weight * grad(sum_r group_consistency(X)_r)`` to the
    input gradients. The losses it reports stay the matching losses (gradient distance and
    image priors), so the best iterate of each restart is still chosen by how well it matches."""

    def __init__(self, cfg, evaluate: Callable[[], Evaluation], X: torch.Tensor):
        self.cfg, self.evaluate, self.X = cfg, evaluate, X
        self.iteration = 0

    def __call__(self) -> Evaluation:
        gx, gy, values = self.evaluate()
        weight = group_weight(self.cfg, self.iteration)
        if weight:
            x = self.X.detach().requires_grad_(True)
            gx = gx + weight * torch.autograd.grad(group_consistency(x).sum(), x)[0]
        return gx, gy, values


def _consensus_result(objective: Callable, best, iterations: int, interrupted: bool) -> "RestartResult":
    """The consensus of the group's best iterates, scored by the matching loss like a restart."""
    x = consensus(best.x)
    y = None if best.y is None else consensus(best.y)
    value = float(objective(x, y, None, functional=False).detach())
    return RestartResult(restart=-1, x=x, y_soft=y, loss=value if math.isfinite(value) else math.inf,
                         iterations=iterations, consensus=True, interrupted=interrupted)


# ------------------------------------------------------------------------ best iterate
class _Best:
    """The best iterate of every restart by matching loss (non-finite losses never count),
    and the iteration of the last improvement of any restart (for ``patience``)."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor | None):
        self.loss = torch.full((X.shape[0],), math.inf, dtype=torch.float64)
        self.x, self.y = _snapshot(X, Y)
        self.last_improvement = 0

    def keep(self, values: torch.Tensor, x_seen: torch.Tensor, y_seen: torch.Tensor | None, iteration: int) -> None:
        values = values.to(torch.float64).cpu()
        better = torch.isfinite(values) & (values < self.loss)
        if bool(better.any()):
            self.last_improvement = iteration
            self.loss[better] = values[better]
            mask = better.to(self.x.device)
            self.x[mask] = x_seen[mask]
            if self.y is not None:
                self.y[mask] = y_seen[mask]


# ------------------------------------------------- between steps: rewind, the box constraint
def _rewind(optimizer, X: torch.Tensor, Y: torch.Tensor | None, best: _Best) -> None:
    """``rewind``: every restart with a finite best loss goes back to its best iterate so far, and the
    optimiser's moments are cleared (they belong to the trajectory left behind). On trained networks the
    matching loss bottoms out after 150-300 iterations at the step schedule's first learning rate and
    then rises (docs/models.md); rewinding makes each shorter step start from the best point found."""
    found = torch.isfinite(best.loss).to(X.device)
    with torch.no_grad():
        X[found] = best.x[found]
        if Y is not None:
            Y[found] = best.y[found]
    optimizer.state.clear()


def _rewind_note(group: list[int], rewound: list[int]) -> str:
    """Says where ``rewind`` sent the restarts back (the iterations after each decay)."""
    return (f"rewind: restarts {group} went back to their best iterate after the learning-rate decay(s) at "
            f"iteration(s) {', '.join(map(str, rewound))}")


def _project(X: torch.Tensor, bounds) -> None:
    """The box constraint: clamp the candidates into the image of [0, 1] under the data spec."""
    with torch.no_grad():
        X.copy_(torch.maximum(torch.minimum(X, bounds[1]), bounds[0]))


# ---------------------------------------------------------------------------- recording
def _record(series: dict[str, Any], key: str, iteration: int, value: float) -> None:
    entry = series.setdefault(key, {"x": [], "y": []})
    entry["x"].append(iteration)
    entry["y"].append(value)


def _recording_due(cfg, iteration: int) -> bool:
    return iteration % cfg.record_every == 0 or iteration == cfg.iterations - 1


def _record_iteration(histories: list[dict[str, Any]], iteration: int, values: torch.Tensor, best: _Best,
                      monitors: list[Callable | None], spec) -> None:
    """Each slot's matching loss at this iteration, and what its monitor says of its best iterate."""
    for k, value in enumerate(values.tolist()):
        _record(histories[k], "loss", iteration, value)
        if monitors[k] is not None:
            for key, metric in monitors[k](spec.denormalize(best.x[k])).items():
                _record(histories[k], key, iteration, float(metric))


# ------------------------------------------------------------------------ stopping rules
def _stop_reason(cfg, X: torch.Tensor, best: _Best, iteration: int, group: list[int],
                 deadline: float | None = None) -> str | None:
    """Why the loop stops after this iteration (a note), or None to go on."""
    if not bool(torch.isfinite(X).all()):
        return (f"restarts {group}: the candidate diverged (non-finite) at iteration {iteration}; "
                "kept the best finite iterate")
    if cfg.tol is not None and bool((best.loss < cfg.tol).all()):
        return f"stopped at iteration {iteration}: matching loss below tol={cfg.tol}"
    if cfg.patience is not None and iteration - best.last_improvement >= cfg.patience:
        return f"stopped at iteration {iteration}: no improvement for {cfg.patience} iterations"
    if deadline is not None and time.perf_counter() >= deadline:
        return f"stopped at iteration {iteration}: time budget of {cfg.time_budget:g} s spent"
    return None


def _final_evaluation(cfg, evaluate: Callable[[], Evaluation], X: torch.Tensor, Y: torch.Tensor | None,
                      best: _Best) -> None:
    """After the last iteration the candidates have taken one more step: score them too."""
    if bool(torch.isfinite(X).all()):
        _, _, values = evaluate()
        best.keep(values, *_snapshot(X, Y), cfg.iterations)


# ---------------------------------------------------------------------------- the loop
def _check_image_options(cfg, shape: tuple[int, ...]) -> None:
    """Options that only make sense for image candidates (B, C, H, W), refused before any work."""
    if len(shape) == 4:
        return
    if cfg.precondition:
        raise ConfigError(f"precondition={cfg.precondition:g} filters images: it needs candidates of shape (B, C, H, W), "
                          f"got {tuple(shape)}")
    if cfg.init in FLAT_INITS:
        raise ConfigError(f"init={cfg.init!r} starts from uniform images: it needs candidates of shape (B, C, H, W), "
                          f"got {tuple(shape)}")


def run_group(attack, objective: Callable, group: list[int], shape: tuple[int, ...], classes: int,
              optimize_labels: bool, bounds, spec, loss_name: str, vectorized: bool = True, data: Any = None,
              monitors: list[Callable | None] | None = None, stop_after: int | None = None) -> list[RestartResult]:
    """Optimise the slots ``group`` (their restart numbers, which seed their initial candidates)
    together; one :class:`RestartResult` per slot, and one more for the group's consensus when
    the group-consistency term is on (``group > 0``).

    ``data``: the target data of each slot stacked along a leading dimension (several
    independent updates attacked at once; ``objective(x, y_soft, data_of_the_slot)``), with
    ``monitors`` one monitor per slot; None: every slot matches the objective's own update and
    the attack's monitor watches them all. Stopping rules (``tol``, ``patience``, divergence,
    ``time_budget``) act on the whole group: callers batch targets only without them.
    ``stop_after``: stop after that many iterations of the full schedule (restart screening)."""
    cfg, hooks = attack.config, attack._hooks
    _check_image_options(cfg, shape)
    X, Y = _candidates(cfg, group, shape, classes, optimize_labels, loss_name, spec, bounds[0].dtype, bounds[0].device)
    start, between = getattr(attack, "initial_candidates", None), getattr(attack, "candidate_step", None)
    monitors = [hooks.monitor] * len(group) if monitors is None else monitors
    evaluate = evaluator(objective, X, Y, data, vectorized, compiled=cfg.compile)
    consistent = cfg.group > 0 and len(group) > 1
    if consistent:
        evaluate = _GroupConsistency(cfg, evaluate, X)
    optimizer = _optimizer(cfg, [X] if Y is None else [X, Y])
    scheduler = _scheduler(cfg, optimizer)
    best = _Best(X, Y)
    histories: list[dict[str, Any]] = [{} for _ in group]
    notes: list[str] = []
    rewound: list[int] = []
    iteration, interrupted = 0, False
    deadline = None if cfg.time_budget is None else time.perf_counter() + cfg.time_budget
    try:
        if start is not None:
            start(group, objective, data, X, Y)
        if cfg.init in FLAT_INITS:
            notes.extend(_flat_starts(cfg, objective, group, data, X, Y, bounds))
        for iteration in range(cfg.iterations):
            if consistent:
                evaluate.iteration = iteration
            lr = optimizer.param_groups[0]["lr"]
            values, x_seen, y_seen = _step(cfg, optimizer, evaluate, X, Y)
            if scheduler is not None:
                scheduler.step()
            if cfg.boxed:
                _project(X, bounds)
            best.keep(values, x_seen, y_seen, iteration)
            if cfg.rewind and optimizer.param_groups[0]["lr"] < lr:
                _rewind(optimizer, X, Y, best)
                rewound.append(iteration + 1)
            if _recording_due(cfg, iteration):
                _record_iteration(histories, iteration, values, best, monitors, spec)
            if between is not None:
                between(iteration, group, objective, data, X, Y)
            if hooks.progress is not None:
                hooks.progress(iteration + 1, cfg.iterations)
            stop = _stop_reason(cfg, X, best, iteration, group, deadline)
            if stop is None and stop_after is not None and iteration + 1 >= stop_after:
                break
            if stop is not None:
                notes.append(stop)
                break
        else:
            _final_evaluation(cfg, evaluate, X, Y, best)
    except KeyboardInterrupt:  # Ctrl-C anywhere in the loop: stop here, keep the best iterate
        interrupted = True
        notes.append(f"interrupted at iteration {iteration} of {cfg.iterations}: kept the best iterate so far")
    if rewound:
        notes.append(_rewind_note(group, rewound))
    results = [RestartResult(restart=r, x=best.x[k], y_soft=None if best.y is None else best.y[k],
                             loss=float(best.loss[k]), iterations=iteration + 1, history=histories[k],
                             notes=notes if k == 0 else [], interrupted=interrupted) for k, r in enumerate(group)]
    if consistent:
        results.append(_consensus_result(objective, best, iteration + 1, interrupted))
    return results
