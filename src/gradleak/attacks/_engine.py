"""The optimisation loop of :class:`~gradleak.attacks.optimization.GradientMatching`.

One call optimises a group of restarts stacked along a leading dimension: with
``torch.func.vmap`` when the group has several restarts (element-wise optimisers make
the stacked problem exactly R independent ones), plainly when it has one. The loop keeps
the best iterate of every restart (by matching loss), records curves, reports progress,
stops early on ``tol``/``patience``, and turns Ctrl-C into "stop here, keep the best": the
results are marked ``interrupted`` so that the callers stop too (no further restart, update
or audit cell runs, and nothing interrupted is stored as finished).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.func import grad_and_value, vmap

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


def _initial(cfg, restart: int, shape, spec, dtype, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + restart)
    if cfg.init == "randn":
        x = torch.randn(shape, generator=generator, dtype=dtype)
    elif cfg.init == "rand":
        x = spec.normalize(torch.rand(shape, generator=generator, dtype=dtype))
    else:
        x = torch.zeros(shape, dtype=dtype)
    return x.to(device)


def _optimizer(cfg, tensors):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=cfg.lr)
    return torch.optim.LBFGS(tensors, lr=cfg.lr, history_size=cfg.lbfgs_history, max_iter=cfg.lbfgs_inner,
                             line_search_fn=cfg.line_search)


def _scheduler(cfg, optimizer):
    n = cfg.iterations
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [n * 3 // 8, n * 5 // 8, n * 7 // 8], gamma=0.1)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n)
    return None


def _record(series: dict[str, Any], key: str, iteration: int, value: float) -> None:
    entry = series.setdefault(key, {"x": [], "y": []})
    entry["x"].append(iteration)
    entry["y"].append(value)


def run_group(attack, objective: Callable, group: list[int], shape: tuple[int, ...], classes: int,
              optimize_labels: bool, bounds, spec, loss_name: str) -> list[RestartResult]:
    from .optimization import _signed

    cfg, hooks = attack.config, attack._hooks
    dtype, device = bounds[0].dtype, bounds[0].device
    X = torch.stack([_initial(cfg, r, shape, spec, dtype, device) for r in group]).requires_grad_(True)
    Y = None
    if optimize_labels:
        label_shape = (shape[0],) if loss_name == "binary_cross_entropy" else (shape[0], classes)
        Y = torch.stack([torch.randn(label_shape, generator=torch.Generator().manual_seed(cfg.seed + 7919 * r),
                                     dtype=dtype) for r in group]).to(device).requires_grad_(True)
    single = grad_and_value(objective, argnums=(0, 1) if Y is not None else 0)

    def evaluate():
        x, y = X.detach(), None if Y is None else Y.detach()
        if len(group) > 1:
            grads, values = vmap(single, in_dims=(0, 0 if y is not None else None))(x, y)
            gx, gy = grads if isinstance(grads, tuple) else (grads, None)
            return gx, gy, values.detach()
        inputs = [x[0].requires_grad_(True)] + ([] if y is None else [y[0].requires_grad_(True)])
        value = objective(inputs[0], None if y is None else inputs[1], functional=False)
        grads = torch.autograd.grad(value, inputs)
        return grads[0][None], None if y is None else grads[1][None], value.detach()[None]

    optimizer = _optimizer(cfg, [X] if Y is None else [X, Y])
    scheduler = _scheduler(cfg, optimizer)
    best_loss = torch.full((len(group),), math.inf, dtype=torch.float64)
    best_x, best_y = X.detach().clone(), None if Y is None else Y.detach().clone()
    histories: list[dict[str, Any]] = [{} for _ in group]
    notes: list[str] = []
    last_improvement, iteration, interrupted = 0, 0, False

    def keep_best(values, x_seen, y_seen, it):
        nonlocal last_improvement
        values = values.to(torch.float64).cpu()
        better = torch.isfinite(values) & (values < best_loss)
        if bool(better.any()):
            last_improvement = it
            best_loss[better] = values[better]
            mask = better.to(device)
            best_x[mask] = x_seen[mask]
            if best_y is not None:
                best_y[mask] = y_seen[mask]

    try:
        for iteration in range(cfg.iterations):
            if cfg.optimizer == "lbfgs":
                seen: dict[str, torch.Tensor] = {}

                def closure():
                    optimizer.zero_grad()
                    gx, gy, values = evaluate()
                    X.grad = gx
                    if Y is not None:
                        Y.grad = gy
                    if not seen:
                        seen.update(values=values, x=X.detach().clone(),
                                    y=None if Y is None else Y.detach().clone())
                    return values.sum()

                optimizer.step(closure)
                values, x_seen, y_seen = seen["values"], seen["x"], seen["y"]
            else:
                gx, gy, values = evaluate()
                x_seen, y_seen = X.detach().clone(), None if Y is None else Y.detach().clone()
                X.grad = _signed(gx, cfg.signed)
                if Y is not None:
                    Y.grad = gy
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if cfg.boxed:
                with torch.no_grad():
                    X.copy_(torch.maximum(torch.minimum(X, bounds[1]), bounds[0]))
            keep_best(values, x_seen, y_seen, iteration)
            if iteration % cfg.record_every == 0 or iteration == cfg.iterations - 1:
                for k, value in enumerate(values.tolist()):
                    _record(histories[k], "loss", iteration, value)
                    if hooks.monitor is not None:
                        for key, metric in hooks.monitor(spec.denormalize(best_x[k])).items():
                            _record(histories[k], key, iteration, float(metric))
            if hooks.progress is not None:
                hooks.progress(iteration + 1, cfg.iterations)
            if not bool(torch.isfinite(X).all()):
                notes.append(f"restarts {group}: the candidate diverged (non-finite) at iteration {iteration}; "
                             "kept the best finite iterate")
                break
            if cfg.tol is not None and bool((best_loss < cfg.tol).all()):
                notes.append(f"stopped at iteration {iteration}: matching loss below tol={cfg.tol}")
                break
            if cfg.patience is not None and iteration - last_improvement >= cfg.patience:
                notes.append(f"stopped at iteration {iteration}: no improvement for {cfg.patience} iterations")
                break
        else:
            if bool(torch.isfinite(X).all()):
                _, _, values = evaluate()
                keep_best(values, X.detach().clone(), None if Y is None else Y.detach().clone(), cfg.iterations)
    except KeyboardInterrupt:
        interrupted = True
        notes.append(f"interrupted at iteration {iteration} of {cfg.iterations}: kept the best iterate so far")
    return [RestartResult(restart=r, x=best_x[k], y_soft=None if best_y is None else best_y[k],
                          loss=float(best_loss[k]), iterations=iteration + 1, history=histories[k],
                          notes=notes if k == 0 else [], interrupted=interrupted) for k, r in enumerate(group)]
