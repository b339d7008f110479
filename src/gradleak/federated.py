"""Federated training under a defense: what the defense costs in accuracy.

:func:`train_federated` trains a model with N clients for R rounds on real data (the
built-in ``digits`` by default), every client defending its update with the same stack
of defenses the attacks are measured against (:func:`gradleak.defenses.defend_client`),
and reports the test accuracy of the global model. The clients hold disjoint shards of
the training split; every client takes part in every round.

- FedSGD (McMahan et al. 2017): each client shares the gradient of its whole shard; the
  server steps ``w -= server_lr * mean(gradients)``.
- FedAvg: each client runs the local steps of its ``ClientSetup`` and shares the delta;
  the server steps ``w += server_lr * mean(deltas)``.

Aggregation defenses (secure aggregation) do not change the mean the server applies, so
they cost no accuracy by construction; DP-SGD's epsilon over the whole training is
reported from Opacus's accountant.

BatchNorm running statistics travel with the updates (``update.buffers``, as the clients'
forward passes left them); the server averages the floating ones over the clients and
takes the maximum of the integer ones (``num_batches_tracked``), so a federatedly trained
BatchNorm model has running statistics to evaluate with. Accuracy is measured in eval mode.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .client import ClientSetup, model_state
from .data.builtin import LabeledImages
from .data.spec import DataSpec
from .errors import ConfigError
from .functional import forward
from .models import load_weights

__all__ = ["UtilityResult", "train_federated", "split_dataset", "split_indices", "accuracy", "eval_accuracy",
           "average_buffers"]


@dataclass
class UtilityResult:
    """Test accuracy of the federatedly trained model, per evaluated round, and the privacy spent."""

    defenses: list[dict[str, Any]]
    accuracy: float
    curve: dict[str, list[float]]
    rounds: int
    clients: int
    privacy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"defenses": self.defenses, "accuracy": self.accuracy, "curve": self.curve, "rounds": self.rounds,
                "clients": self.clients, "privacy": self.privacy, "seconds": self.seconds}


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """The indices of a fixed random train/test split of ``n`` items: (train, test)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(n * (1 - test_fraction)))
    return order[:cut], order[cut:]


def split_dataset(data: LabeledImages, test_fraction: float = 0.2, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """A fixed random train/test split of ``data`` (the indices: :func:`split_indices`)."""
    train, test = split_indices(len(data), test_fraction, seed)
    return data.select(train), data.select(test)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: DataSpec, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (its current weights, eval mode not forced) on [0, 1] images.
    A model with one output (a binary head) predicts class 1 where its logit is positive."""
    params, buffers = model_state(model)
    correct = 0
    for start in range(0, images.shape[0], batch):
        logits = forward(model, params, buffers, spec.normalize(images[start:start + batch]))
        if logits.ndim == 1 or logits.shape[-1] == 1:
            predicted = (logits.reshape(logits.shape[0]) > 0).long()
        else:
            predicted = logits.argmax(1)
        correct += int((predicted == labels[start:start + batch]).sum())
    return correct / images.shape[0]


@torch.no_grad()
def average_buffers(model: nn.Module, updates: list) -> None:
    """Set ``model``'s buffers from the clients' (``update.buffers``): floating ones to their
    mean, integer ones (``num_batches_tracked``) to their maximum. Nothing changes when a
    client shared no buffers (a model without any, or a defense that drops them)."""
    if not updates or any(u.buffers is None for u in updates):
        return
    for name, buffer in model.named_buffers():
        if not all(name in u.buffers for u in updates):
            continue
        stacked = torch.stack([u.buffers[name].to(device=buffer.device, dtype=buffer.dtype) for u in updates])
        buffer.copy_(stacked.mean(0) if buffer.is_floating_point() else stacked.max(0).values)


def eval_accuracy(model: nn.Module, data: LabeledImages, spec: DataSpec) -> float:
    """:func:`accuracy` on ``data`` in eval mode (BatchNorm with its running statistics);
    the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return accuracy(model, data.images, data.labels, spec)
    finally:
        model.train(was_training)


def train_federated(model: nn.Module, train: LabeledImages, test: LabeledImages, *, clients: int = 10,
                    rounds: int = 50, setup: ClientSetup | None = None, defenses: Any = None, server_lr: float = 1.0,
                    loss: str = "cross_entropy", spec: DataSpec | None = None, seed: int = 0, eval_every: int = 5,
                    progress: Callable[[int, int], None] | None = None,
                    on_round: Callable[[int, nn.Module], None] | None = None) -> UtilityResult:
    """Train a copy of ``model`` federatedly with every client applying ``defenses``; return
    the test accuracy of the global model.

    ``setup`` gives the protocol (fedsgd: the gradient of the client's whole shard; fedavg:
    local SGD with ``setup.lr``, ``local_steps``/``epochs``, ``local_batch_size``).
    ``server_lr`` scales the averaged update (FedSGD: it is the learning rate). The clients'
    BatchNorm buffers are averaged into the global model (see the module's notes).
    ``on_round(r, model)`` is called after round r (1-based) with the global model, e.g. to
    save a checkpoint; the model is the one training continues with: copy what you keep."""
    from .defenses import defend_client, make_defenses

    for name, value in (("clients", clients), ("rounds", rounds), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if len(train) < clients:
        raise ConfigError(f"{len(train)} training images cannot be split over clients={clients}")
    setup = setup or ClientSetup()
    stack = make_defenses(defenses)
    spec = spec or DataSpec.from_images(train.images)
    net = copy.deepcopy(model)
    shards = torch.tensor_split(torch.arange(len(train)), clients)  # exactly `clients` shards
    curve: dict[str, list[float]] = {"round": [], "accuracy": []}
    privacy: dict[str, Any] = {}
    start = time.perf_counter()
    for r in range(rounds):
        params, _ = model_state(net)
        updates = []
        for k, shard in enumerate(shards):
            update, spent = defend_client(net, train.images[shard], train.labels[shard], setup, stack, loss=loss,
                                          spec=spec, seed=seed + 1_000 * r + k)
            updates.append(update)
            privacy = spent or privacy
        sign = -1.0 if updates[0].kind == "gradient" else 1.0
        step = {n: sign * server_lr * torch.stack([u.tensors[n] for u in updates]).mean(0) for n in params}
        load_weights(net, {n: params[n] + step[n] for n in params})
        average_buffers(net, updates)
        if on_round is not None:
            on_round(r + 1, net)
        if (r + 1) % eval_every == 0 or r == rounds - 1:
            curve["round"].append(r + 1)
            curve["accuracy"].append(eval_accuracy(net, test, spec))
        if progress is not None:
            progress(r + 1, rounds)
    if privacy:
        from .defenses import epsilon_spent

        privacy = dict(privacy, epsilon_training=epsilon_spent(privacy["noise_multiplier"], privacy["sample_rate"],
                                                                privacy["steps"] * rounds, privacy["delta"],
                                                                privacy["accountant"]))
    return UtilityResult(defenses=[d.describe() for d in stack], accuracy=curve["accuracy"][-1], curve=curve,
                         rounds=rounds, clients=clients, privacy=privacy, seconds=time.perf_counter() - start)
