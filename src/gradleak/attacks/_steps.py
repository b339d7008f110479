"""One optimisation step of the gradient-matching engine (:mod:`._engine`): the optimiser and
its learning-rate schedule, the signed (Inverting Gradients, Geiping et al. 2020) or tanh-scaled
input gradient, spectral preconditioning, and the first-order or L-BFGS step itself."""

from __future__ import annotations

from typing import Callable

import torch

from ._evaluators import Evaluation

__all__ = ["spectral_precondition"]


def _snapshot(X: torch.Tensor, Y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return X.detach().clone(), None if Y is None else Y.detach().clone()


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
    if cfg.schedule == "exponential":  # lr x 0.01 over the run (LAMP: x0.89 every 50 of 2,000 steps)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / n))
    return None


def _signed(g: torch.Tensor, mode: str | None) -> torch.Tensor:
    """The input gradient as the first-order step sees it: ``sign(g)`` (Inverting Gradients),
    ``tanh(g / mean|g|)`` (the mean over each slot's own gradient), or ``g`` itself."""
    if mode == "sign":
        return g.sign()
    if mode == "tanh":
        scale = g.abs().flatten(1).mean(1).clamp_min(1e-30).reshape(-1, *[1] * (g.dim() - 1))
        return torch.tanh(g / scale)
    return g


def spectral_precondition(g: torch.Tensor, exponent: float) -> torch.Tensor:
    """The image gradient ``g`` (..., H, W) with its spatial spectrum scaled by ``|f|^(-2a)``
    (``a = exponent``; ``|f|`` in cycles per pixel, floored at one cycle per image; the weights
    normalised to mean 1): the step that gradient descent takes when the image is parametrised
    in a Fourier basis scaled by ``|f|^(-a)`` (Mordvintsev, Pezzotti, Schubert, Olah 2018,
    "Differentiable Image Parameterizations", Distill; Olah et al. 2017 "Feature Visualization").
    Low frequencies move faster than high ones. Why here: a trained network's matching objective
    responds most to high-frequency texture (its first-layer filters are edge detectors), and the
    raw signed step builds texture that a plain image does not have (docs/models.md).
    Valid for image candidates; linear, so ``exponent = 0`` returns ``g`` unchanged."""
    if not exponent:
        return g
    height, width = g.shape[-2:]
    fy = torch.fft.fftfreq(height, dtype=g.dtype, device=g.device).abs()[:, None]
    fx = torch.fft.rfftfreq(width, dtype=g.dtype, device=g.device)[None, :]
    weight = (fy.square() + fx.square()).sqrt().clamp_min(1.0 / max(height, width)).pow(-2 * exponent)
    return torch.fft.irfft2(torch.fft.rfft2(g) * (weight / weight.mean()), s=(height, width))


def _step(cfg, optimizer, evaluate: Callable[[], Evaluation], X: torch.Tensor, Y: torch.Tensor | None):
    """One step of the optimiser; returns the losses it saw and the candidates they belong to."""
    if cfg.optimizer == "lbfgs":
        return _lbfgs_step(optimizer, evaluate, X, Y)
    return _first_order_step(cfg, optimizer, evaluate, X, Y)


def _lbfgs_step(optimizer, evaluate: Callable[[], Evaluation], X: torch.Tensor, Y: torch.Tensor | None):
    """One L-BFGS step (its inner iterations and line search re-evaluate through the closure);
    the loss reported is that of the closure's first evaluation, at the candidates before the step."""
    seen: dict[str, torch.Tensor] = {}

    def closure():
        optimizer.zero_grad()
        gx, gy, values = evaluate()
        X.grad = gx
        if Y is not None:
            Y.grad = gy
        if not seen:
            x_seen, y_seen = _snapshot(X, Y)
            seen.update(values=values, x=x_seen, y=y_seen)
        return values.sum()

    optimizer.step(closure)
    return seen["values"], seen["x"], seen["y"]


def _first_order_step(cfg, optimizer, evaluate: Callable[[], Evaluation], X: torch.Tensor, Y: torch.Tensor | None):
    """One Adam/SGD step on the (signed) input gradient and the plain soft-label gradient."""
    gx, gy, values = evaluate()
    x_seen, y_seen = _snapshot(X, Y)
    X.grad = _signed(spectral_precondition(gx, cfg.precondition), cfg.signed)
    if Y is not None:
        Y.grad = gy
    optimizer.step()
    return values, x_seen, y_seen
