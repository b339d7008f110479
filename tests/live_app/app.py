"""A Flower app written as ``flwr new`` writes a PyTorch app, not for gradleak.

Its own small model (``TinyNet``, outside gradleak's zoo), real images (scikit-learn's 8x8
digits, a couple per client), a plain SGD loop on each client, plain ``FedAvg`` on the
server, and Flower's own names everywhere: the run config has ``num-server-rounds``,
``local-epochs``, ``learning-rate`` and ``batch-size`` (``pyproject.toml``'s
``[tool.flwr.app.config]`` in a real app), the server sends ``{"lr": ...}`` in its train
config, and each client replies with ``train_loss``, ``num-examples``, ``local-steps`` and
``batch-size``. The only gradleak in it is :func:`audited`, the server-side wrapper with no
ground truth: what a privacy officer would add to an existing federation.

``tests/test_flower_live.py`` drives it with hand-built Messages (fast) and, marked slow,
in Flower's simulation engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

RUN_CONFIG = {"num-server-rounds": 2, "local-epochs": 1, "learning-rate": 0.1, "batch-size": 32}


def run_config(context: Context) -> dict[str, Any]:
    """The app's run config: ``pyproject.toml``'s defaults (``RUN_CONFIG``) under what the run sets."""
    return {**RUN_CONFIG, **dict(context.run_config)}
# partition -> (first digit, examples, the client's own minibatch cap): two clients with 2 images
# (one local step of 2), one with 4 in minibatches of 2 (two local steps)
PARTITIONS = {0: (0, 2, 32), 1: (2, 2, 32), 2: (4, 4, 2)}
INPUT_SHAPE, CLASSES = (1, 8, 8), 10


class TinyNet(nn.Module):
    """The app's own model: one hidden layer of 128 ReLU units on 8x8 images."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_net(hidden: int = 128, seed: int = 0) -> TinyNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyNet(int(hidden))


def load_partition(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's real images, (N, 1, 8, 8) in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    first, n, _ = PARTITIONS[partition]
    images = torch.tensor(digits.images[first:first + n], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target[first:first + n], dtype=torch.int64)


# ------------------------------------------------------------------------- the ClientApp
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Local training as Flower's PyTorch template does it: SGD over the partition in order."""
    partition = int(context.node_config["partition-id"])
    model = tiny_net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    images, labels = load_partition(partition)
    config = run_config(context)
    batch = min(int(config["batch-size"]), PARTITIONS[partition][2])
    optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    steps, loss = 0, torch.tensor(0.0)
    model.train()
    for _ in range(int(config["local-epochs"])):
        for start in range(0, len(images), batch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[start:start + batch]), labels[start:start + batch])
            loss.backward()
            optimizer.step()
            steps += 1
    metrics = {"train_loss": float(loss.detach()), "num-examples": len(images), "local-steps": steps, "batch-size": batch}
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


# ------------------------------------------------------------------------- the ServerApp
def audited(strategy: FedAvg, run_config: dict[str, Any], out: str | Path, **options: Any):
    """The one gradleak line: ``strategy`` wrapped in a leakage audit with no ground truth,
    told what the server knows (its own run config) and where to keep the captured updates."""
    from gradleak.flower import LeakageAuditStrategy
    from gradleak.models import ModelSpec

    return LeakageAuditStrategy(strategy, ModelSpec("live_app.app:tiny_net", device="cpu"), input_shape=INPUT_SHAPE,
                                num_classes=CLASSES, protocol=run_config, capture_dir=Path(out) / "updates",
                                **options)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = run_config(context)
    out = Path(os.environ.get("LIVE_APP_OUT", "runs/live-app"))
    strategy = audited(FedAvg(fraction_evaluate=0.0), config, out, attacks=("auto", {"iterations": 30}),
                       secure_aggregation=True)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_net().state_dict()),
                            num_rounds=int(config["num-server-rounds"]),
                            train_config=ConfigRecord({"lr": float(config["learning-rate"])}))
    from safetensors.torch import save_file

    from gradleak.flower import write_report

    write_report(out, strategy)
    save_file({k: v.contiguous() for k, v in result.arrays.to_torch_state_dict().items()},
              str(out / "final.safetensors"))
