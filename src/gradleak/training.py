"""Training a model to attack: centralised or federated, on real images.

Inverting Gradients (Geiping et al. 2020) found that trained networks leak their inputs
too, not only freshly initialised ones. :func:`train_model` trains a zoo model or the
user's own (any :class:`~gradleak.models.ModelSpec`) on built-in or local images and
writes what an attack needs::

    out/
      weights.safetensors               the state dict (BatchNorm buffers included)
      training.json                     spec, plan, data, held-out indices, accuracy curve, digests
      checkpoints/epoch-0005.safetensors   (federated: round-0005) at the chosen epochs/rounds

The weights load with ``ModelSpec(name, options, weights=out / "weights.safetensors")``.
A fixed share of the images (``test_fraction``) is held out and never trained on; their
indices are recorded so that an attack can target images the model never saw.

- Centralised: a plain PyTorch loop in train mode over shuffled minibatches (SGD with
  momentum 0.9, or Adam), the order drawn from the plan's seed.
- Federated: :func:`gradleak.federated.train_federated` with ``clients`` clients holding
  disjoint shards (FedAvg with one local epoch unless the plan's ``client`` says
  otherwise); checkpoints are the global model after the chosen rounds.

Held-out accuracy is measured in eval mode (BatchNorm with its running statistics).
Ctrl-C stops training; what was trained so far is written, marked ``"interrupted": true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._io import atomic_write_bytes, atomic_write_json, staged_folder
from .client import ClientSetup
from .data.builtin import LabeledImages
from .data.request import DataRequest
from .data.spec import DataSpec
from .errors import ConfigError, GradleakError, one_line
from .federated import eval_accuracy, split_indices
from .limits import LIMITS, check_float, check_int, check_seed, short_repr
from .models.spec import BuiltModel, ModelSpec, model_outputs

__all__ = ["TrainPlan", "TrainResult", "train_model", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam")
MAX_EPOCHS = LIMITS["epochs"].high
MAX_CLIENTS = LIMITS["clients"].high


@dataclass(frozen=True)
class TrainPlan:
    """How to train. ``epochs``: passes over the training images (centralised) or rounds
    (federated, ``clients`` set). ``optimizer``: ``sgd`` (momentum 0.9) or ``adam``, with
    ``lr``, ``weight_decay`` and minibatches of ``batch_size`` (centralised). Federated:
    every client takes part in every round with the protocol of ``client`` (default: FedAvg,
    one local epoch of plain SGD with ``lr`` in minibatches of ``batch_size``); the server
    scales the mean update by ``server_lr``. ``checkpoints``: the epochs/rounds after which
    the weights are saved. Held-out accuracy is measured every ``eval_every`` and at the end."""

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 32
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    test_fraction: float = 0.2
    clients: int | None = None
    client: ClientSetup | None = None
    server_lr: float = 1.0
    checkpoints: tuple[int, ...] = ()
    seed: int = 0
    eval_every: int = 1

    def __post_init__(self):
        check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        check_float("lr", self.lr, low_open=True)
        check_int("batch_size", self.batch_size, 1, ClientSetup.MAX_BATCH)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {short_repr(self.optimizer)}")
        check_float("weight_decay", self.weight_decay)
        if check_float("test_fraction", self.test_fraction, low_open=True, high=1.0) == 1.0:
            raise ConfigError("test_fraction must be below 1 (some images must be left to train on), got 1")
        if self.clients is not None:
            check_int("clients", self.clients, 1, MAX_CLIENTS)
        if self.client is not None and not isinstance(self.client, ClientSetup):
            raise ConfigError(f"client must be a ClientSetup, got {short_repr(self.client)}")
        check_float("server_lr", self.server_lr, low_open=True)
        check_seed("seed", self.seed)
        check_int("eval_every", self.eval_every, 1, MAX_EPOCHS)
        object.__setattr__(self, "checkpoints", self._checked_checkpoints())
        self._check_federated()

    def _checked_checkpoints(self) -> tuple[int, ...]:
        values = self.checkpoints
        if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
            raise ConfigError(f"checkpoints must be a list of {self.unit}s, got {short_repr(values)}")
        for value in values:
            check_int(f"checkpoint {self.unit}", value, 1, self.epochs)
        return tuple(sorted(set(values)))

    def _check_federated(self) -> None:
        if self.clients is None:
            if self.client is not None:
                raise ConfigError("client settings apply to federated training; give clients=N as well")
            return
        if self.optimizer != "sgd":
            raise ConfigError(f"optimizer {self.optimizer!r} applies to centralised training; federated clients "
                              "run the plain SGD of their client setup")
        if self.weight_decay:
            raise ConfigError("weight_decay applies to centralised training; federated clients run plain SGD")

    @property
    def federated(self) -> bool:
        return self.clients is not None

    @property
    def unit(self) -> str:
        """What one pass is called: ``epoch`` (centralised) or ``round`` (federated)."""
        return "round" if self.federated else "epoch"

    @property
    def client_setup(self) -> ClientSetup:
        """The federated clients' protocol: ``client``, or FedAvg with one local epoch."""
        return self.client or ClientSetup(protocol="fedavg", epochs=1, lr=self.lr, local_batch_size=self.batch_size,
                                          seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "client"}
        out["checkpoints"] = list(self.checkpoints)
        out["client"] = self.client_setup.to_json() if self.federated else None
        return out


@dataclass
class TrainResult:
    """The trained ``model`` (its spec's mode, on its device) and what ``training.json`` holds.
    Indices are into the data source (a request's ``start`` included); ``completed`` counts
    the epochs/rounds finished (after Ctrl-C the weights are those of the moment it came,
    which may be part-way into the next epoch); paths are ``None`` when nothing was written."""

    model: nn.Module
    spec: ModelSpec
    plan: TrainPlan
    data: dict[str, Any]
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    loss: str
    data_spec: DataSpec
    train_indices: list[int]
    held_out_indices: list[int]
    curve: dict[str, list[float]] = field(default_factory=dict)
    train_accuracy: float | None = None
    held_out_accuracy: float | None = None
    completed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    out: Path | None = None
    weights_sha256: str | None = None
    checkpoints: dict[int, dict[str, str]] = field(default_factory=dict)   # k -> {"path", "sha256"}

    @property
    def weights(self) -> Path | None:
        return None if self.out is None else self.out / "weights.safetensors"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.spec.to_json(), "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "loss": self.loss, "plan": self.plan.to_json(), "data": self.data, "classes": list(self.classes),
                "data_spec": self.data_spec.to_json(), "train_size": len(self.train_indices),
                "test_size": len(self.held_out_indices), "train_indices": self.train_indices,
                "held_out_indices": self.held_out_indices, "curve": self.curve,
                "train_accuracy": self.train_accuracy, "held_out_accuracy": self.held_out_accuracy,
                "unit": self.plan.unit, "completed": self.completed, "seconds": self.seconds,
                "interrupted": self.interrupted, "weights": "weights.safetensors" if self.out else None,
                "weights_sha256": self.weights_sha256,
                "checkpoints": {str(k): v for k, v in sorted(self.checkpoints.items())}}


def _load(data: DataRequest | LabeledImages) -> tuple[LabeledImages, dict[str, Any], int]:
    """The images, how they were named (JSON), and the index of the first in its source."""
    if isinstance(data, DataRequest):
        return data.load(), data.to_json(), data.start
    if isinstance(data, LabeledImages):
        return data, {"name": data.name, "n": len(data), "size": int(data.images.shape[-1]), "start": 0}, 0
    raise ConfigError(f"data must be a DataRequest or LabeledImages, got {type(data).__name__}")


def _split(dataset: LabeledImages, plan: TrainPlan) -> tuple[list[int], list[int]]:
    train, test = split_indices(len(dataset), plan.test_fraction, plan.seed)
    if not train or not test:
        raise ConfigError(f"test_fraction {plan.test_fraction:g} of {len(dataset)} image(s) leaves "
                          f"{'no held-out' if not test else 'no training'} image; use more images")
    if plan.federated and len(train) < plan.clients:
        raise ConfigError(f"{len(train)} training images cannot be split over clients={plan.clients}")
    return train, test


def _build(spec: ModelSpec, dataset: LabeledImages) -> BuiltModel:
    """The model for these images, checked to have an output for every class."""
    classes = len(dataset.classes)
    built = spec.build(tuple(dataset.images.shape[1:]), max(classes, 2))
    outputs = model_outputs(spec.name, built.module, built.input_shape)
    if built.loss == "binary_cross_entropy" and classes > 2:
        raise ConfigError(f"model {spec.label} has one output (binary cross-entropy, 0/1 labels) but the data has "
                          f"{classes} classes")
    if built.loss == "cross_entropy" and outputs < classes:
        raise ConfigError(f"model {spec.label} has {outputs} outputs but the data has {classes} classes")
    return built


class _Session:
    """What happens after every epoch/round: evaluation, checkpoint, divergence check, progress."""

    def __init__(self, result: TrainResult, test: LabeledImages, bar, progress: Callable[[int, int], None] | None):
        self.result, self.test, self.bar, self.progress = result, test, bar, progress
        self.plan = result.plan
        self.model = result.model
        self.task = bar.add_task(self._label(), total=self.plan.epochs)

    def _label(self) -> str:
        held = self.result.held_out_accuracy
        return f"training ({self.plan.unit}s)" + ("" if held is None else f"  held-out {100 * held:.1f} %")

    def after(self, k: int, model: nn.Module) -> None:
        """Called with the model after epoch/round ``k`` (1-based)."""
        self.model = model
        self.result.completed = k
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            rates = (f"the clients' lr={self.plan.client_setup.lr:g}, server_lr={self.plan.server_lr:g}"
                     if self.plan.federated else f"lr={self.plan.lr:g}")
            raise ConfigError(f"training diverged: the weights hold NaN or infinite values after {self.plan.unit} "
                              f"{k}; lower the learning rate ({rates})")
        if k % self.plan.eval_every == 0 or k == self.plan.epochs:
            self.result.held_out_accuracy = eval_accuracy(model, self.test, self.result.data_spec)
            self.result.curve[self.plan.unit].append(k)
            self.result.curve["accuracy"].append(self.result.held_out_accuracy)
        if k in self.plan.checkpoints and self.result.out is not None:
            name = f"checkpoints/{self.plan.unit}-{k:04d}.safetensors"
            digest = _save_weights(self.result.out / name, model, self.result.data_spec)
            self.result.checkpoints[k] = {"path": name, "sha256": digest}
        self.bar.update(self.task, completed=k, description=self._label())
        if self.progress is not None:
            self.progress(k, self.plan.epochs)


def _state_bytes(model: nn.Module, data_spec: DataSpec | None = None) -> bytes:
    from safetensors.torch import save

    from .models.weights import weights_metadata

    state = {name: t.detach().to("cpu").clone().contiguous() for name, t in model.state_dict().items()}
    return save(state, metadata=weights_metadata(data_spec))   # one key: the header's order is then fixed


def _save_weights(path: Path, model: nn.Module, data_spec: DataSpec | None = None) -> str:
    """Write ``model``'s state dict as safetensors (atomically), recording the input
    normalization it was trained with; return the file's SHA-256."""
    data = _state_bytes(model, data_spec)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _optimizer(model: nn.Module, plan: TrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=0.9, weight_decay=plan.weight_decay)


def _train_centralised(built: BuiltModel, train: LabeledImages, session: _Session) -> None:
    """Epochs of minibatch training in train mode; the order of every epoch from the seed."""
    from .losses import get_loss

    plan, module, device = session.plan, built.module, built.device
    loss_fn, optimizer = get_loss(built.loss), _optimizer(module, plan)
    x, y = session.result.data_spec.normalize(train.images), train.labels
    generator = torch.Generator().manual_seed(plan.seed)
    batches = math.ceil(len(train) / plan.batch_size)   # even sizes: no stray minibatch of one
    module.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(plan.seed)   # dropout and other randomness in the forward pass
        for epoch in range(1, plan.epochs + 1):
            for indices in torch.tensor_split(torch.randperm(len(train), generator=generator), batches):
                indices = indices.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss_fn(module(x[indices]), y[indices]).backward()
                optimizer.step()
            session.after(epoch, module)


def _train_federated(built: BuiltModel, train: LabeledImages, session: _Session) -> None:
    """Rounds of :func:`~gradleak.federated.train_federated`; the session sees every round."""
    from .federated import train_federated

    plan = session.plan
    built.module.train()
    train_federated(built.module, train, session.test, clients=plan.clients, rounds=plan.epochs,
                    setup=plan.client_setup, server_lr=plan.server_lr, loss=built.loss,
                    spec=session.result.data_spec, seed=plan.seed, eval_every=plan.epochs, on_round=session.after)


def _run(built: BuiltModel, train: LabeledImages, session: _Session) -> None:
    """Train; a failure inside the user's model or PyTorch becomes one line."""
    try:
        (_train_federated if session.plan.federated else _train_centralised)(built, train, session)
    except GradleakError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise ConfigError(f"training {built.spec.label} failed after {session.result.completed} "
                          f"{session.plan.unit}(s): {type(error).__name__}: {one_line(error, 300)}") from None


def train_model(spec: ModelSpec, data: DataRequest | LabeledImages, plan: TrainPlan, out: Path | str | None = None,
                *, quiet: bool = False, progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train ``spec``'s model (its weights file, if any, as the initialisation) on ``data``
    as ``plan`` says, holding out ``plan.test_fraction`` of the images; with ``out``, write
    the weights, ``training.json`` and the checkpoints there (see the module's notes).

    ``progress(done, total)`` is called after every epoch/round; a rich progress bar is
    shown unless ``quiet``. Ctrl-C returns the result so far marked ``interrupted`` (and
    writes it). Bad input is a :class:`~gradleak.errors.ConfigError` before any training."""
    from .pipeline import progress_bar

    if not isinstance(spec, ModelSpec) or not isinstance(plan, TrainPlan):
        raise ConfigError("train_model takes a ModelSpec and a TrainPlan")
    if plan.checkpoints and out is None:
        raise ConfigError(f"checkpoints {list(plan.checkpoints)} are written under out; give an output folder")
    dataset, record, first = _load(data)
    train_idx, test_idx = _split(dataset, plan)
    built = _build(spec, dataset)
    dataset = dataset.to(dtype=built.dtype, device=built.device)
    train, test = dataset.select(train_idx), dataset.select(test_idx)
    result = TrainResult(built.module, spec, plan, record, dataset.classes, built.input_shape, built.num_classes,
                         built.loss, DataSpec.from_images(train.images), [first + i for i in train_idx],
                         [first + i for i in test_idx], curve={plan.unit: [], "accuracy": []})
    with contextlib.ExitStack() as stack:
        if out is not None:  # written whole or not at all; Ctrl-C keeps what was trained
            result.out = stack.enter_context(staged_folder(out))
        start = time.perf_counter()
        with progress_bar(quiet) as bar:
            session = _Session(result, test, bar, progress)
            try:
                _run(built, train, session)
            except KeyboardInterrupt:
                result.interrupted = True
        _finish(result, session.model, train, test, time.perf_counter() - start)
    result.out = None if out is None else Path(out)
    return result


def _finish(result: TrainResult, model: nn.Module, train: LabeledImages, test: LabeledImages,
            seconds: float) -> TrainResult:
    """Final accuracies; the trained weights into ``result.model``; the files, when asked."""
    if model is not result.model:   # federated: the global model trained in a copy
        result.model.load_state_dict(model.state_dict())
    result.train_accuracy = eval_accuracy(result.model, train, result.data_spec)
    result.held_out_accuracy = eval_accuracy(result.model, test, result.data_spec)
    result.model.train(result.spec.mode == "train")
    result.seconds = seconds
    if result.out is not None:
        result.weights_sha256 = _save_weights(result.weights, result.model, result.data_spec)
        atomic_write_json(result.out / "training.json", result.to_json())
    return result
