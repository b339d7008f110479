"""A Flower app audited by gradleak: a ClientApp that trains a PyTorch model with a plain SGD
loop (behind a gradleak leakage gate), and a ServerApp running FedAvg wrapped in
``LeakageAuditStrategy``. ``run.py`` starts it in Flower's simulation engine and writes the
report; this module only builds the apps, so that a deployment (``flwr run``) could use
them too.

The federation: built-in real images (scikit-learn's digits by default, or the LFW faces)
split over the clients, each client with its own amount of data and minibatch size, so
that the audit shows the whole range: one client with a single image (one local step),
one with a batch of 4 in one step, larger clients with several local steps. The server
sends the learning rate and the number of epochs in its train config
(``training_config``); each client reports what it ran in its metrics
(``training_metrics``): both sides of gradleak's contract.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradleak.data import load_builtin
from gradleak.data.spec import DataSpec
from gradleak.flower import (LeakageAuditStrategy, leakage_gate, metrics_without_audit, read_training_config,
                             training_config, training_metrics)
from gradleak.models import ModelSpec

# (examples, minibatch size) per client; more clients repeat the pattern
CLIENT_PLAN = ((1, 1), (4, 4), (16, 8), (32, 8))


@dataclass(frozen=True)
class Settings:
    """Everything the apps need (frozen and picklable: Ray ships it to the ClientApp actors)."""

    out: str
    data: str = "digits"
    size: int = 16
    model: str = "lenet"
    model_options: tuple[tuple[str, Any], ...] = ()
    clients: int = 4
    rounds: int = 3
    lr: float = 0.1
    epochs: int = 1
    plan: tuple[tuple[int, int], ...] = CLIENT_PLAN
    held_out: int = 300
    attacks: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
        ("rgap", ()), ("inverting-gradients", (("iterations", 300),)))
    audit: bool = True
    secure_aggregation: bool = True
    gate: str = "defense"               # "defense" | "block" | "off"
    gate_defense: str = "gaussian:variance=1e-4"
    gate_threshold: float = 18.0
    gate_time: float = 20.0
    seed: int = 0

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.model, dict(self.model_options), device="cpu", seed=self.seed)

    @property
    def attack_list(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, dict(options)) for name, options in self.attacks]

    def client_plan(self, partition: int) -> tuple[int, int]:
        return self.plan[partition % len(self.plan)]


_DATA: dict[tuple, Any] = {}


def dataset(settings: Settings):
    """The built-in images shuffled once with the seed: clients' data first, then the held-out set."""
    key = (settings.data, settings.size, settings.seed)
    if key not in _DATA:
        data = load_builtin(settings.data, size=settings.size)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))
        _DATA[key] = data.select(order)
    return _DATA[key]


def data_spec(settings: Settings) -> DataSpec:
    """The input normalization every client uses (statistics of the whole built-in set)."""
    return DataSpec.from_images(dataset(settings).images)


def client_data(settings: Settings, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition``'s images ([0, 1], NCHW) and labels."""
    start = sum(settings.client_plan(k)[0] for k in range(partition))
    n = settings.client_plan(partition)[0]
    data = dataset(settings)
    return data.images[start:start + n], data.labels[start:start + n]


def held_out(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    start = sum(settings.client_plan(k)[0] for k in range(settings.clients))
    data = dataset(settings)
    return data.images[start:start + settings.held_out], data.labels[start:start + settings.held_out]


def input_shape(settings: Settings) -> tuple[int, ...]:
    return tuple(dataset(settings).images.shape[1:])


def num_classes(settings: Settings) -> int:
    return len(dataset(settings).classes)


def build_model(settings: Settings) -> torch.nn.Module:
    return settings.spec.build(input_shape(settings), num_classes(settings)).module


def train_locally(model: torch.nn.Module, images, labels, spec: DataSpec, *, lr: float, epochs: int, batch: int,
                  seed: int) -> float:
    """A plain PyTorch loop: SGD (no momentum), mean cross-entropy, shuffled minibatches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(spec.normalize(images[idx])), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def node_file(settings: Settings, node_id: int) -> Path:
    """Where a simulated client notes its partition (evaluation only: the audit's ground truth)."""
    return Path(settings.out) / "nodes" / f"node-{node_id}.json"


def make_client_app(settings: Settings) -> ClientApp:
    """The ClientApp: train on the partition, reply with the full weights and training_metrics."""
    mods = []
    if settings.gate != "off":
        mods.append(leakage_gate(settings.spec, lambda ctx: client_data(settings, int(ctx.node_config["partition-id"])),
                                 num_classes=num_classes(settings), attacks=settings.attack_list,
                                 threshold_psnr=settings.gate_threshold, action=settings.gate,
                                 defense=settings.gate_defense if settings.gate == "defense" else None,
                                 time_budget=settings.gate_time, data_spec=data_spec(settings), seed=settings.seed))
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        n, batch = settings.client_plan(partition)
        images, labels = client_data(settings, partition)
        config = read_training_config(msg.content["config"])
        lr, epochs = config["lr"] or settings.lr, config["epochs"] or settings.epochs
        model = build_model(settings)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"].get("server-round", 0))
        loss = train_locally(model, images, labels, data_spec(settings), lr=lr, epochs=epochs, batch=batch,
                             seed=settings.seed * 1_000_003 + 1009 * partition + server_round)
        path = node_file(settings, context.node_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"partition": partition}))
        os.replace(tmp, path)
        metrics = MetricRecord({"train-loss": loss, "partition-id": partition,   # the audit names the client by it
                                **training_metrics(n, lr, batch, epochs=epochs)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


def truth_of(settings: Settings) -> Callable[[int, int], Any]:
    """The audit's ground truth (evaluation only): the partition a node noted, and its data."""
    def truth(node_id: int, server_round: int):
        path = node_file(settings, node_id)
        if not path.is_file():
            return None
        return client_data(settings, int(json.loads(path.read_text())["partition"]))
    return truth


def make_strategy(settings: Settings):
    """FedAvg, wrapped in the audit unless ``settings.audit`` is off."""
    # the audit's per-client metrics (gradleak-*, partition-id) are kept out of FedAvg's weighted averages
    fedavg = FedAvg(fraction_evaluate=0.0, min_train_nodes=settings.clients, min_available_nodes=settings.clients,
                    train_metrics_aggr_fn=metrics_without_audit)
    if not settings.audit:
        return fedavg
    return LeakageAuditStrategy(
        fedavg, settings.spec, input_shape=input_shape(settings), num_classes=num_classes(settings),
        attacks=settings.attack_list, truth=truth_of(settings), data_spec=data_spec(settings),
        capture_dir=Path(settings.out) / "updates", secure_aggregation=settings.secure_aggregation, seed=settings.seed)


def accuracy(settings: Settings, arrays: ArrayRecord) -> float:
    model = build_model(settings)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    images, labels = held_out(settings)
    with torch.no_grad():
        return float((model(data_spec(settings).normalize(images)).argmax(1) == labels).float().mean())


def make_server_app(settings: Settings, strategy, results: dict) -> ServerApp:
    """The ServerApp: ``strategy.start`` for ``settings.rounds`` rounds; held-out accuracy per
    round and the final arrays go into ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        initial = ArrayRecord(build_model(settings).state_dict())

        started = time.perf_counter()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            value = accuracy(settings, arrays)
            results.setdefault("accuracy", {})[server_round] = value
            if server_round:  # round 0 is the initial model: the rounds' pace gives the time left
                spent = time.perf_counter() - started
                left = spent / server_round * (settings.rounds - server_round)
                print(f"round {server_round}/{settings.rounds} done after {spent:.0f} s; about {left:.0f} s left "
                      f"(held-out accuracy {100 * value:.1f} %)", file=sys.stderr, flush=True)
            return MetricRecord({"held-out-accuracy": value})

        config = ConfigRecord(training_config(settings.lr, epochs=settings.epochs))
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.rounds, train_config=config,
                                evaluate_fn=evaluate)
        results["arrays"] = result.arrays

    return app
