"""Simulated federated clients: FedSGD gradients and FedAvg weight deltas.

Both are functional (``torch.func.functional_call``): the user's model is never
modified, and the same code runs on CPU and CUDA. Both are deterministic given a seed
(minibatch order and any randomness in the forward pass, e.g. dropout, are drawn from
it without touching the global RNG of the caller).

- FedSGD (McMahan et al. 2017): the client shares the gradient of the mean loss over its
  batch, at the global weights.
- FedAvg: the client runs K local SGD steps (or E local epochs) over minibatches of its
  data with learning rate ``lr`` and shares the weight delta ``w_local - w_global``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn
from torch.func import grad

from .data.spec import DataSpec
from .errors import ConfigError
from .functional import buffers_after_forward, task_loss
from .limits import LIMITS, check_bool, check_float, check_int, check_seed, short_repr
from .losses import get_loss
from .update import SharedUpdate

__all__ = ["ClientSetup", "client_update", "fedsgd_update", "fedavg_update", "model_state"]


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of the model's trainable parameters and of its buffers."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_batch(images: torch.Tensor, labels: torch.Tensor, loss: str, share_labels: bool = False) -> None:
    if loss == "causal_lm":  # a language model: the targets are the token ids themselves, never shared
        if not isinstance(images, torch.Tensor) or images.ndim != 2 or images.is_floating_point():
            raise ConfigError(f"causal_lm: inputs must be (B, n) token ids, got {getattr(images, 'shape', images)!r}")
        if not isinstance(labels, torch.Tensor) or not torch.equal(labels, images):
            raise ConfigError("causal_lm: the targets of a language model are its token ids; pass them as labels")
        if share_labels:
            raise ConfigError("share_labels: a language model's targets are its text; a client never shares them")
        return
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise ConfigError(f"images must be a tensor of shape (B, C, H, W) or (B, F), got {getattr(images, 'shape', images)!r}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ConfigError(f"labels must be a 1-D tensor with one label per image ({images.shape[0]}), "
                          f"got shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.is_floating_point():
        raise ConfigError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if loss == "binary_cross_entropy" and not bool(((labels == 0) | (labels == 1)).all()):
        raise ConfigError(f"loss 'binary_cross_entropy' needs 0/1 labels, got {sorted(set(labels.tolist()))}")


def _shared_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The buffers an update carries: none for a text model (gradleak.text: its buffers are
    position ids, or the frozen base weights of a LoRA model, which the server sent)."""
    return {} if getattr(model, "task", None) in ("causal-lm", "classification") else buffers


def shared_metadata(images, spec, loss, share_labels, labels, params, buffers, model_info, mode=None):
    """The update's metadata besides its tensors; ``mode``: the client ran ``model`` in
    train or eval mode (what BatchNorm normalises with), recorded so attacks use the same."""
    return dict(
        mode=mode,
        loss=loss,
        labels=labels.detach().clone() if share_labels else None,
        weights=params,
        buffers=buffers or None,
        parameters={n: tuple(p.shape) for n, p in params.items()},
        input_shape=tuple(images.shape[1:]),
        data_spec=spec,
        model=model_info,
    )


def fedsgd_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "cross_entropy",
    spec: DataSpec | None = None,
    share_labels: bool = False,
    seed: int = 0,
    model_info: dict | None = None,
) -> SharedUpdate:
    """The FedSGD update: gradient of the mean ``loss`` over the batch at the current weights.

    ``images`` are [0, 1] NCHW (normalized with ``spec`` before the model sees them).
    ``model_info`` ({"name", "kwargs"}) records a zoo model so files can be re-attacked.
    """
    _check_batch(images, labels, loss, share_labels)
    spec = spec or DataSpec()
    params, buffers = model_state(model)
    loss_fn = get_loss(loss)
    x = spec.normalize(images)
    with _seeded(seed, images.device):
        gradient = grad(task_loss(model, buffers, loss_fn, x, labels))(params)
        buffers = buffers_after_forward(model, params, buffers, x)
    return SharedUpdate(
        tensors={n: g.detach() for n, g in gradient.items()},
        kind="gradient",
        batch_size=images.shape[0],
        **shared_metadata(images, spec, loss, share_labels, labels, params, _shared_buffers(model, buffers), model_info,
                          mode="train" if model.training else "eval"),
    )


def _minibatch_schedule(n: int, batch_size: int, steps: int | None, epochs: int | None, generator) -> list[torch.Tensor]:
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    schedule: list[torch.Tensor] = []
    while len(schedule) < total:
        order = torch.randperm(n, generator=generator)
        schedule.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return schedule[:total]


def fedavg_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    local_steps: int | None = None,
    epochs: int | None = None,
    local_batch_size: int | None = None,
    loss: str = "cross_entropy",
    spec: DataSpec | None = None,
    share_labels: bool = False,
    seed: int = 0,
    model_info: dict | None = None,
) -> SharedUpdate:
    """The FedAvg update: ``w_local - w_global`` after local SGD.

    Give exactly one of ``local_steps`` (K SGD steps) or ``epochs`` (E passes over the
    data). Each pass visits the data in an order drawn from ``seed``, in minibatches of
    ``local_batch_size`` (default: the whole batch).
    """
    _check_batch(images, labels, loss, share_labels)
    if (local_steps is None) == (epochs is None):
        raise ConfigError("give exactly one of local_steps and epochs")
    for name, value in (("local_steps", local_steps), ("epochs", epochs), ("local_batch_size", local_batch_size)):
        if value is not None:
            check_int(name, value, 1, ClientSetup.MAX_BATCH if name == "local_batch_size" else ClientSetup.MAX_STEPS)
    check_float("lr", lr, low_open=True)
    n = images.shape[0]
    batch = min(local_batch_size or n, n)
    spec = spec or DataSpec()
    params, buffers = model_state(model)
    loss_fn = get_loss(loss)
    generator = torch.Generator().manual_seed(seed)
    schedule = _minibatch_schedule(n, batch, local_steps, epochs, generator)
    local = dict(params)
    x = spec.normalize(images)
    with _seeded(seed, images.device):
        for indices in schedule:
            indices = indices.to(images.device)
            g = grad(task_loss(model, buffers, loss_fn, x[indices], labels[indices]))(local)
            buffers = buffers_after_forward(model, local, buffers, x[indices])
            local = {name: local[name] - lr * g[name] for name in local}
    return SharedUpdate(
        tensors={name: (local[name] - params[name]).detach() for name in params},
        kind="delta",
        batch_size=n,
        local_steps=len(schedule),
        local_lr=float(lr),
        local_epochs=epochs,
        local_batch_size=batch,
        **shared_metadata(images, spec, loss, share_labels, labels, params, _shared_buffers(model, buffers), model_info,
                          mode="train" if model.training else "eval"),
    )


@dataclass
class ClientSetup:
    """How simulated clients train and what they share.

    protocol: "fedsgd" (one gradient of the batch mean) or "fedavg" (weight delta after
    local SGD with ``lr`` for ``local_steps`` steps or ``epochs`` epochs in minibatches of
    ``local_batch_size``). ``batch_size``: images per client.

    Every field is checked on construction (and by ``dataclasses.replace``), so a bad value
    is refused in one line naming it before any client trains: counts are positive integers
    within ``MAX_*`` below, ``lr`` a positive finite number, ``seed`` in 0..2**63-1, flags
    booleans, ``extra`` a mapping with string keys. At most one of ``local_steps`` and
    ``epochs`` is given; under FedAvg without either, one local step.
    """

    MAX_BATCH: ClassVar[int] = LIMITS["local_batch"].high   # images per client, minibatch size
    MAX_STEPS: ClassVar[int] = LIMITS["local_steps"].high   # local SGD steps
    MAX_EPOCHS: ClassVar[int] = LIMITS["local_epochs"].high  # local epochs

    protocol: str = "fedsgd"
    batch_size: int = 1
    lr: float = 0.1
    local_steps: int | None = None
    epochs: int | None = None
    local_batch_size: int | None = None
    share_labels: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.protocol, str) or self.protocol not in ("fedsgd", "fedavg"):
            raise ConfigError(f"protocol must be 'fedsgd' or 'fedavg', got {short_repr(self.protocol)}")
        check_int("batch_size", self.batch_size, 1, self.MAX_BATCH)
        for name, high in (("local_steps", self.MAX_STEPS), ("epochs", self.MAX_EPOCHS),
                           ("local_batch_size", self.MAX_BATCH)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, high)
        if self.local_steps is not None and self.epochs is not None:
            raise ConfigError(f"give at most one of local_steps ({self.local_steps}) and epochs ({self.epochs})")
        check_float("lr", self.lr, low_open=True)
        check_bool("share_labels", self.share_labels)
        check_seed("seed", self.seed)
        if not isinstance(self.extra, Mapping) or not all(isinstance(k, str) for k in self.extra):
            raise ConfigError(f"extra must be a mapping with string keys, got {short_repr(self.extra)}")
        if self.protocol == "fedavg" and self.local_steps is None and self.epochs is None:
            self.local_steps = 1

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "extra"} | dict(self.extra)


def client_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup, *,
                  loss: str = "cross_entropy", spec: DataSpec | None = None, seed: int = 0,
                  model_info: dict | None = None) -> SharedUpdate:
    """One client's update under ``setup``: its FedSGD gradient or its FedAvg weight delta."""
    common = dict(loss=loss, spec=spec, share_labels=setup.share_labels, seed=seed, model_info=model_info)
    if setup.protocol == "fedsgd":
        return fedsgd_update(model, images, labels, **common)
    return fedavg_update(model, images, labels, lr=setup.lr, local_steps=setup.local_steps, epochs=setup.epochs,
                         local_batch_size=setup.local_batch_size, **common)
