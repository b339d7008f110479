"""Running a stack of defenses: client stage, then update stage in order, then aggregation.

:func:`defended_updates` is the one place where simulated clients meet defenses; the
attack pipeline, the audit and the federated utility training all call it, so a defense
means the same thing in every measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from .._io import to_jsonable
from ..client import ClientSetup, client_update
from ..data.spec import DataSpec
from ..errors import ConfigError
from ..update import SharedUpdate
from .base import ClientContext, Defense, make_defenses

__all__ = ["DefendedUpdate", "defended_updates", "defend_client", "aggregate_updates"]


@dataclass
class DefendedUpdate:
    """One update as the server sees it, the indices of the images behind it, and the
    privacy spent for it (DP defenses: epsilon, delta, noise multiplier)."""

    update: SharedUpdate
    indices: list[int]
    privacy: dict[str, Any] = field(default_factory=dict)


def defend_client(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup,
                  defenses: Sequence[Defense], *, loss: str = "cross_entropy", spec: DataSpec | None = None,
                  seed: int = 0, model_info: dict | None = None) -> tuple[SharedUpdate, dict[str, Any]]:
    """One client's update after the client and update stages of ``defenses``; and its privacy record."""
    spec = spec or DataSpec()
    for defense in defenses:
        if hasattr(defense, "inspect"):  # e.g. inspect-model: refuse a manipulated model before training
            defense.inspect(model, spec.normalize(images))
        setup = defense.configure(setup)
    private = next((d for d in defenses if d.private_training() is not None), None)
    privacy: dict[str, Any] = {}
    if private is not None:
        from .dp import private_client_update

        update, privacy = private_client_update(model, images, labels, setup, private.private_training(), loss=loss,
                                                spec=spec, seed=seed, model_info=model_info)
    else:
        update = client_update(model, images, labels, setup, loss=loss, spec=spec, seed=seed, model_info=model_info)
    context = ClientContext(model, images, labels, spec, loss, seed)
    for k, defense in enumerate(d for d in defenses if d.stage == "update"):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (k + 1))
        update = defense.apply(update, context, generator)
    if defenses:
        # travels in the update file's JSON header: non-finite epsilons become "inf"
        update = replace(update, extra={**dict(update.extra), "defenses": to_jsonable([d.describe() for d in defenses]),
                                        **({"privacy": to_jsonable(privacy)} if privacy else {})})
    return update, privacy


def aggregate_updates(updates: Sequence[SharedUpdate]) -> SharedUpdate:
    """What the server sees under secure aggregation: the mean of the clients' tensors.

    The sum and the mean carry the same information when the number of clients is
    known. For FedSGD with equal batches the mean is exactly the gradient of the whole
    union batch, so the result is an update of batch size ``sum(batch sizes)``; BatchNorm
    statistics and per-client metadata that do not survive summation are dropped."""
    if not updates:
        raise ConfigError("aggregate_updates: no updates")
    first = updates[0]
    for k, u in enumerate(updates[1:], 1):
        if u.kind != first.kind or set(u.tensors) != set(first.tensors) or u.local_steps != first.local_steps:
            raise ConfigError(f"aggregate_updates: update {k} differs from update 0 in kind, parameters or local steps")
    if len(updates) == 1:
        return first
    tensors = {n: torch.stack([u.tensors[n] for u in updates]).mean(0) for n in first.tensors}
    sizes = [u.batch_size for u in updates]
    labels = None if any(u.labels is None for u in updates) else torch.cat([u.labels for u in updates])
    return replace(first, tensors=tensors, batch_size=None if None in sizes else sum(sizes), labels=labels,
                   buffers=None, extra={**dict(first.extra), "aggregated_clients": len(updates)})


def defended_updates(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup | None = None,
                     defenses: Any = None, *, loss: str = "cross_entropy", spec: DataSpec | None = None,
                     model_info: dict | None = None) -> list[DefendedUpdate]:
    """Split ``images`` into consecutive clients of ``setup.batch_size``, let each train and
    defend as ``defenses`` say, and return the updates as the server sees them.

    ``defenses``: a list of :class:`Defense` or specs (see :func:`make_defenses`). Client k
    uses seed ``setup.seed + k``. Under an aggregation defense each returned update covers
    the images of all the clients it sums."""
    setup = setup or ClientSetup()
    stack = make_defenses(defenses)
    if images.shape[0] % setup.batch_size:
        raise ConfigError(f"{images.shape[0]} images do not split into clients of batch_size={setup.batch_size}")
    clients: list[tuple[SharedUpdate, list[int], dict[str, Any]]] = []
    for k, start in enumerate(range(0, images.shape[0], setup.batch_size)):
        indices = list(range(start, start + setup.batch_size))
        update, privacy = defend_client(model, images[start: start + setup.batch_size],
                                        labels[start: start + setup.batch_size], setup, stack, loss=loss, spec=spec,
                                        seed=setup.seed + k, model_info=model_info)
        clients.append((update, indices, privacy))
    aggregator = next((d for d in stack if d.stage == "aggregate"), None)
    groups = aggregator.aggregate([u for u, _, _ in clients]) if aggregator else [[k] for k in range(len(clients))]
    out = []
    for group in groups:
        members = [clients[k] for k in group]
        privacy = max((m[2] for m in members), key=lambda p: p.get("epsilon", 0.0), default={})
        out.append(DefendedUpdate(aggregate_updates([m[0] for m in members]), [i for m in members for i in m[1]],
                                  dict(privacy)))
    return out
