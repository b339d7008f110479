"""The training losses a client may use, by name.

The name travels in the update's metadata so that an attacker recomputes gradients
with the same loss the client used. Each loss takes the model output and integer
labels and returns the mean over the batch (FedSGD shares the gradient of the mean).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["LOSSES", "get_loss", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of (B, K) logits against (B,) class indices."""
    return F.cross_entropy(logits, labels)


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy ``-[y log p + (1-y) log(1-p)]`` with ``p = sigmoid(z)``.

    ``logits`` is (B,) or (B, 1); ``labels`` holds 0/1. This is the loss of the exercise
    network (seed 000, Problem 1); its eq. (2) is the log-likelihood, whose negative is
    the loss minimised here.
    """
    return F.binary_cross_entropy_with_logits(logits.reshape(labels.shape[0]), labels.to(logits.dtype))


def causal_lm(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a language model: (B, n, V) logits against the (B, n)
    token ids themselves, position i predicting token i + 1, mean over the B (n - 1) targets."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "causal_lm": causal_lm,
}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None
