"""``gradleak train``: train a model to attack, centralised or federated."""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from .._io import new_run_dir, replacing
from ._common import (ClientOpt, DeviceOpt, DType, DTypeOpt, ModelOptionOpt, OverwriteOpt, QuietOpt, VerboseOpt,
                      WeightsOpt, app, client_setup, err, friendly, limited, model_spec, parse_options, say, setup_logging)


class Optimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"


def _client(pairs: Optional[list[str]], clients: Optional[int], lr: float, batch_size: int, seed: int):
    """The federated clients' setup: FedAvg, one local epoch, --lr and --batch-size, under --client pairs."""
    if not pairs:
        return None
    if clients is None:
        from ..errors import ConfigError

        raise ConfigError("--client settings apply to federated training; give --clients N as well")
    defaults = dict(protocol="fedavg", lr=lr, local_batch_size=batch_size, seed=seed)
    if "local_steps" not in parse_options(pairs, "--client"):
        defaults["epochs"] = 1
    return client_setup(pairs, **defaults)


def _data(data: str, n: Optional[int], size: Optional[int]):
    """A DataRequest for ``--n`` images; without it, every image of the set (named as given)."""
    from ..data.request import DataRequest

    if n is not None:
        return DataRequest(data, n, size)
    from dataclasses import replace

    from ..data import load_dataset

    return replace(load_dataset(data, size=size), name=data)


@app.command()
@friendly
def train(
    model: str = typer.Option("mlp", help="Zoo name (see `gradleak list`) or package.module:factory."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    weights: Optional[str] = WeightsOpt,
    device: str = DeviceOpt,
    dtype: DType = DTypeOpt,
    seed: int = typer.Option(0, help="Seed of the initialisation, the split and the minibatch order."),
    data: str = typer.Option("digits", help="Built-in data (photos, faces, digits) or a path (image folder, "
                                            "CIFAR batches, MNIST idx)."),
    n: Optional[int] = limited("images", None, help="Number of images (default: all of them)."),
    size: Optional[int] = limited("side", 32, help="Image side in pixels (resize); use the same with `attack`."),
    epochs: int = limited("epochs", 10, help="Epochs (centralised) or rounds (federated, with --clients)."),
    lr: float = typer.Option(0.01, help="Learning rate (federated: the clients' local SGD)."),
    batch_size: int = limited("local_batch", 32, help="Minibatch size (federated: the clients' local minibatches)."),
    optimizer: Optimizer = typer.Option(Optimizer.sgd, help="sgd (momentum 0.9) or adam; centralised only."),
    weight_decay: float = typer.Option(0.0, help="Weight decay; centralised only."),
    clients: Optional[int] = limited("clients", None, help="Train federatedly over N clients (disjoint shards)."),
    client: Optional[list[str]] = ClientOpt,
    server_lr: float = typer.Option(1.0, help="Federated: the server's step on the mean update."),
    checkpoint: Optional[list[int]] = typer.Option(None, "--checkpoint", help="Also save the weights after this "
                                                   "epoch/round (checkpoints/epoch-0005.safetensors). Repeatable."),
    test_fraction: float = typer.Option(0.2, help="Share of the images held out (never trained on)."),
    eval_every: int = limited("epochs", 1, help="Measure held-out accuracy every this many epochs/rounds."),
    out: Optional[str] = typer.Option(None, help="Folder to write weights.safetensors, training.json, checkpoints/ "
                                                 "(default: a new runs/train-<date>-<time>)."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Train a model on real images, centralised or federated, and write its weights (load them
    with --weights in any command), training.json (held-out indices, accuracy curve) and
    checkpoints, so that attacks can run against trained networks and earlier rounds."""
    from ..training import TrainPlan, train_model

    setup_logging(quiet, verbose)
    out_path = new_run_dir("train", out, overwrite=overwrite)
    spec = model_spec(model, model_option, weights, device, None, dtype, seed)
    plan = TrainPlan(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer.value,
                     weight_decay=weight_decay, test_fraction=test_fraction, clients=clients,
                     client=_client(client, clients, lr, batch_size, seed), server_lr=server_lr,
                     checkpoints=tuple(checkpoint or ()), seed=seed, eval_every=eval_every)
    with replacing(out_path, overwrite):
        result = train_model(spec, _data(data, n, size), plan, out_path, quiet=quiet)
    if not quiet:
        say(f"held-out accuracy {100 * result.held_out_accuracy:.1f} % on "
                        f"{len(result.held_out_indices)} images never trained on (train "
                        f"{100 * result.train_accuracy:.1f} %) after {result.completed} {plan.unit}(s)  |  "
                        f"wrote {result.weights}", highlight=False, soft_wrap=True)
    if result.interrupted:
        err.print(f"interrupted after {result.completed} {plan.unit}(s): wrote the weights trained so far to "
                  f"{result.weights}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)
