"""Functional forward passes shared by clients and attacks (``torch.func``).

``model`` is only a blueprint here: parameters and buffers are passed explicitly, the
module is never modified. Buffers (BatchNorm running statistics) are cloned *inside* the
function, so that a train-mode BatchNorm may update them while the call is being
differentiated with ``torch.func.grad`` (mutating a captured tensor is not allowed).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["forward", "task_loss", "buffers_after_forward", "has_batch_norm", "batch_norm_in_train_mode"]


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with the given parameters and (copies of the) buffers."""
    return functional_call(model, ({**params}, {n: b.clone() for n, b in buffers.items()}), (x,))


def task_loss(model: nn.Module, buffers: Mapping[str, torch.Tensor], loss_fn: Callable, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """``params -> loss_fn(model(x), y)``: the client's training loss as a function of the weights."""

    def loss(params):
        return loss_fn(forward(model, params, buffers, x), y)

    return loss


@torch.no_grad()
def buffers_after_forward(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                          x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers as a train-mode forward pass on ``x`` leaves them (BatchNorm running statistics)."""
    updated = {n: b.clone() for n, b in buffers.items()}
    if updated:
        functional_call(model, ({**params}, updated), (x,))
    return updated


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_norm_in_train_mode(model: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises with the batch's own statistics (train mode, or no
    running statistics): then the samples of a batch are coupled. In eval mode a BatchNorm is
    a fixed per-channel affine map and every sample is independent (``vmap`` can batch them)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())
