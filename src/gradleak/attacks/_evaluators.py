"""How the optimisation loop (:mod:`._engine`) evaluates a group of candidates ("slots"):
the matching loss and its gradients with respect to each slot's input (and soft labels),
through one ``torch.func.vmap`` of the slots' losses (differentiated outside it), a loop of
plain autograd calls (BatchNorm, whose batch statistics must stay each restart's own), plain
autograd for a single slot, or ``torch.compile`` of the functional evaluation."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import grad_and_value, vmap

__all__ = ["Evaluation", "evaluator", "slot"]

# What one evaluation of the group returns: the input gradient, the soft-label gradient
# (or None) and the matching loss, each stacked over the restarts.
Evaluation = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


def evaluator(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any, vectorized: bool = True,
               compiled: bool = False) -> Callable[[], Evaluation]:
    """The matching loss of the current candidates and its gradients: one ``vmap`` over the
    slots when there are several (``vectorized``) or a loop over them, plain autograd
    (cheaper) for one. ``data``: each slot's target data, stacked (None: the objective's own).
    ``compiled``: the functional evaluation through ``torch.compile`` (``vmap`` of
    ``grad_and_value`` for several slots, ``grad_and_value`` alone for one); the callers refuse
    it for the loop."""
    if compiled:
        return _vmap_evaluator(objective, X, Y, data, compiled=True) if X.shape[0] > 1 else \
            _compiled_single(objective, X, Y, data)
    if X.shape[0] > 1:
        return _vmap_evaluator(objective, X, Y, data) if vectorized else _loop_evaluator(objective, X, Y, data)
    return _autograd_evaluator(objective, X, Y, data)


def slot(data: Any, k: int) -> Any:
    """Slot ``k`` of stacked target data (a dict of tensors, nested), or None."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {key: slot(value, k) for key, value in data.items()}
    return data[k]


def _vmap_evaluator(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any, compiled: bool = False
                    ) -> Callable[[], Evaluation]:
    """The slots' losses under one ``vmap``, differentiated by plain autograd outside it: the slots are
    independent, so the gradient of their sum is each slot's own. One functorch level fewer than
    :func:`_nested_vmap_evaluator` (which the compiled path keeps): the same bits, ~14 % less time
    per iteration for eight LeNet restarts (``benchmarks/restarts.py --evaluators``)."""
    if compiled:
        return _nested_vmap_evaluator(objective, X, Y, data, compiled=True)
    losses = vmap(objective, in_dims=(0, 0 if Y is not None else None, 0 if data is not None else None))

    def evaluate() -> Evaluation:
        inputs = [X.detach().requires_grad_(True)] + ([] if Y is None else [Y.detach().requires_grad_(True)])
        values = losses(inputs[0], None if Y is None else inputs[1], data)
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True, materialize_grads=True)
        return grads[0], None if Y is None else grads[1], values.detach()

    return evaluate


def _nested_vmap_evaluator(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any,
                           compiled: bool = False) -> Callable[[], Evaluation]:
    """``vmap(grad_and_value(objective))``: the form ``torch.compile`` takes (Inductor; autograd.grad
    inside a compiled graph is not safe: benchmarks/compile_step.py), and the restarts benchmark's baseline."""
    dims = (0, 0 if Y is not None else None, 0 if data is not None else None)
    stacked = vmap(grad_and_value(objective, argnums=(0, 1) if Y is not None else 0), in_dims=dims)
    if compiled:
        stacked = torch.compile(stacked, dynamic=False)

    def evaluate() -> Evaluation:
        x, y = X.detach(), None if Y is None else Y.detach()
        grads, values = stacked(x, y, data)
        gx, gy = grads if isinstance(grads, tuple) else (grads, None)
        return gx, gy, values.detach()

    return evaluate


def _autograd_evaluator(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any
                        ) -> Callable[[], Evaluation]:
    own = slot(data, 0)

    def evaluate() -> Evaluation:
        x, y = X.detach(), None if Y is None else Y.detach()
        inputs = [x[0].requires_grad_(True)] + ([] if y is None else [y[0].requires_grad_(True)])
        value = objective(inputs[0], None if y is None else inputs[1], own, functional=False)
        grads = torch.autograd.grad(value, inputs)
        return grads[0][None], None if y is None else grads[1][None], value.detach()[None]

    return evaluate


def _compiled_single(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any
                     ) -> Callable[[], Evaluation]:
    """One slot through ``torch.compile(grad_and_value(objective))`` without ``vmap``: torch
    2.13 has no vmap batching rule for eval-mode batch norm, and its fallback is slow
    (``benchmarks/compile_run.py``)."""
    single = torch.compile(grad_and_value(objective, argnums=(0, 1) if Y is not None else 0), dynamic=False)

    def evaluate() -> Evaluation:
        grads, value = single(X[0].detach(), None if Y is None else Y[0].detach(), slot(data, 0))
        gx, gy = grads if isinstance(grads, tuple) else (grads, None)
        return gx.unsqueeze(0), None if gy is None else gy.unsqueeze(0), value.detach().unsqueeze(0)

    return evaluate


def _loop_evaluator(objective: Callable, X: torch.Tensor, Y: torch.Tensor | None, data: Any
                    ) -> Callable[[], Evaluation]:
    """The slots evaluated one after the other with plain autograd, stacked (BatchNorm
    models: each restart's batch statistics stay its own)."""
    def evaluate() -> Evaluation:
        gx, gy, values = [], [], []
        for r in range(X.shape[0]):
            inputs = [X[r].detach().requires_grad_(True)] + ([] if Y is None else [Y[r].detach().requires_grad_(True)])
            value = objective(inputs[0], None if Y is None else inputs[1], slot(data, r), functional=False)
            grads = torch.autograd.grad(value, inputs)
            gx.append(grads[0])
            gy.append(None if Y is None else grads[1])
            values.append(value.detach())
        return torch.stack(gx), None if Y is None else torch.stack(gy), torch.stack(values)

    return evaluate
