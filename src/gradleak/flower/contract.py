"""Both sides of the contract that tells a Flower server how a client trained.

A Flower train reply carries the client's full local weights and a ``MetricRecord``;
nothing in it says which learning rate, how many local epochs or steps, or which minibatch
size the client used, and without them a weight delta cannot be attacked (the local steps
cannot be unrolled) nor explained. Either side can supply them:

- the client, in its reply's metrics: :func:`training_metrics` returns the entries to put in
  the ``MetricRecord`` (Flower's own ``"num-examples"`` plus ``gradleak-`` keys);
- the server, in the train config it sends: :func:`training_config` returns the entries a
  strategy puts in its ``ConfigRecord`` (and :func:`read_training_config` reads them on
  the client);
- the server, as what it knows of the clients' training: ``LeakageAuditStrategy(...,
  protocol=...)`` with :func:`training_config`'s entries or the app's run config
  (``context.run_config``), for every client or per node (``declared``).

Each value is read under gradleak's key or the names Flower's own templates and examples use
(:data:`ALIASES`: ``lr``, ``learning-rate``, ``local-epochs``, ``local_epochs``,
``local-steps``, ``batch-size``, ``batch_size``...), so an app not written for gradleak is
read as it is. :func:`protocol_of` combines what a reply's metrics say, what the config
asked for and what the server declared into a :class:`ClientProtocol`, recording for every
value where it came from (``metrics``, ``config``, ``declared``, ``computed`` or ``unknown``)
and under which key. Reply metrics are untrusted: every value is checked with
:mod:`gradleak.limits`; an invalid one is recorded as unknown with a one-line reason, never
raised, so a hostile client cannot stop the server.

Flower's ``FedAvg`` refuses to aggregate replies whose metric records do not all have the
same keys, so :func:`training_metrics` always returns every key; 0 stands for "not given"
in ``gradleak-epochs`` and ``gradleak-local-steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from ..limits import MAX_ITERATIONS, check_float, check_int, short_repr

__all__ = ["NUM_EXAMPLES", "LR", "BATCH_SIZE", "EPOCHS", "LOCAL_STEPS", "TRAIN_MODE", "ALIASES", "ClientProtocol",
           "training_metrics", "training_config", "read_training_config", "protocol_of", "check_declared"]

NUM_EXAMPLES = "num-examples"          # Flower's own key: FedAvg weights each reply by it
LR = "gradleak-lr"                     # local SGD learning rate
BATCH_SIZE = "gradleak-batch-size"     # local minibatch size
EPOCHS = "gradleak-epochs"             # local epochs (0: not given)
LOCAL_STEPS = "gradleak-local-steps"   # local SGD steps (0: not given)
TRAIN_MODE = "gradleak-train-mode"     # 1: the model ran in train mode (BatchNorm batch statistics), 0: eval
# every value under gradleak's key first, then the names Flower's templates and examples use
# (`flwr new` apps: run config "local-epochs", "learning-rate", "batch-size"; train config "lr";
# reply metrics "num-examples")
ALIASES: dict[str, tuple[str, ...]] = {
    "lr": (LR, "lr", "learning-rate", "learning_rate"),
    "batch_size": (BATCH_SIZE, "batch-size", "batch_size"),
    "epochs": (EPOCHS, "local-epochs", "local_epochs"),
    "local_steps": (LOCAL_STEPS, "local-steps", "local_steps"),
    "num_examples": (NUM_EXAMPLES, "num_examples"),
}

MAX_EXAMPLES = 2**40                   # a client's dataset size
MAX_LR = 1e6

_BOUNDS = {"num_examples": MAX_EXAMPLES, "batch_size": MAX_EXAMPLES, "epochs": MAX_ITERATIONS,
           "local_steps": MAX_ITERATIONS}


def _count(name: str, value: Any, *, zero: bool = False) -> int | None:
    """An int in 1..bound (0 means 'not given' where ``zero``); else a ConfigError."""
    if zero and value == 0 and not isinstance(value, bool) and isinstance(value, int):
        return None
    return check_int(name, value, 1, _BOUNDS[name])


def _lr(value: Any) -> float:
    return check_float("lr", value, low_open=True, high=MAX_LR)


def training_metrics(num_examples: int, lr: float, batch_size: int, epochs: int | None = None,
                     local_steps: int | None = None, mode: str = "train") -> dict[str, int | float]:
    """The entries a client puts in its train reply's ``MetricRecord`` so that a server can
    audit (and unroll) its update: ``num_examples`` it trained on, SGD learning rate ``lr``,
    minibatch size ``batch_size``, ``epochs`` or ``local_steps`` (one at least), and the
    ``mode`` its model ran in. Every key is always present (0 = not given)."""
    if epochs is None and local_steps is None:
        raise ConfigError("training_metrics: give epochs or local_steps (how long the client trained)")
    if mode not in ("train", "eval"):
        raise ConfigError(f"training_metrics: mode must be 'train' or 'eval', got {short_repr(mode)}")
    return {NUM_EXAMPLES: _count("num_examples", num_examples), LR: _lr(lr),
            BATCH_SIZE: _count("batch_size", batch_size),
            EPOCHS: 0 if epochs is None else _count("epochs", epochs),
            LOCAL_STEPS: 0 if local_steps is None else _count("local_steps", local_steps),
            TRAIN_MODE: int(mode == "train")}


def training_config(lr: float, batch_size: int | None = None, epochs: int | None = None,
                    local_steps: int | None = None) -> dict[str, int | float]:
    """The entries a strategy puts in its train ``ConfigRecord`` to tell clients how to train
    (and the audit how they trained): ``lr``, ``epochs`` or ``local_steps``, and the
    minibatch ``batch_size`` (left out when each client chooses its own)."""
    if epochs is None and local_steps is None:
        raise ConfigError("training_config: give epochs or local_steps")
    config = {LR: _lr(lr), EPOCHS: 0 if epochs is None else _count("epochs", epochs),
              LOCAL_STEPS: 0 if local_steps is None else _count("local_steps", local_steps)}
    if batch_size is not None:
        config[BATCH_SIZE] = _count("batch_size", batch_size)
    return config


def read_training_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """On the client: ``{"lr", "batch_size", "epochs", "local_steps"}`` from a train config
    written by :func:`training_config` (None where absent); a bad value raises ConfigError."""
    def first(name: str) -> Any:
        return next((config[k] for k in ALIASES[name] if config.get(k) is not None), None)

    lr, batch, epochs, steps = first("lr"), first("batch_size"), first("epochs"), first("local_steps")
    return {"lr": None if lr is None else _lr(lr),
            "batch_size": None if batch is None else _count("batch_size", batch),
            "epochs": None if epochs is None else _count("epochs", epochs, zero=True),
            "local_steps": None if steps is None else _count("local_steps", steps, zero=True)}


@dataclass
class ClientProtocol:
    """How one client trained in one round, as far as the server can tell.

    ``sources[name]`` says where each value came from: ``metrics`` (the client's reply),
    ``config`` (the train config the strategy sent), ``declared`` (what the server declared
    it knows), ``computed`` (local steps from epochs, examples and minibatch size) or
    ``unknown``; ``keys[name]`` under which key it was read; ``problems[name]`` why a value
    given was refused or disagrees with another side."""

    lr: float | None = None
    epochs: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None        # local minibatch size (at most num_examples)
    num_examples: int | None = None
    mode: str | None = None              # "train" | "eval" | None (unknown)
    sources: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Everything an attack needs to unroll the client's steps is known."""
        return None not in (self.lr, self.local_steps, self.batch_size, self.num_examples)

    def to_json(self) -> dict[str, Any]:
        return {"lr": self.lr, "epochs": self.epochs, "local_steps": self.local_steps, "batch_size": self.batch_size,
                "num_examples": self.num_examples, "mode": self.mode, "sources": dict(self.sources),
                "problems": dict(self.problems), "keys": dict(self.keys)}


_CHECKS = {"lr": _lr, "batch_size": lambda v: _count("batch_size", v),
           "epochs": lambda v: _count("epochs", v, zero=True),
           "local_steps": lambda v: _count("local_steps", v, zero=True),
           "num_examples": lambda v: _count("num_examples", v)}
_SIDES = {"num_examples": ("metrics", "declared")}    # the train config is the same for every client
_SAYS = {"metrics": "the client reports", "config": "the config asked for", "declared": "the server declared"}
_OWNER = {"metrics": "client's", "config": "config's", "declared": "declared"}


def _read(name: str, side: str, values: Mapping[str, Any], protocol: ClientProtocol) -> tuple[Any, str | None]:
    """The checked value of ``name`` on one side and its key, or (None, None): absent, 'not
    given' (0 for epochs and steps), or refused with the reason kept in ``protocol.problems``.
    Several of its names on one side that disagree: the first (gradleak's key first) is used."""
    found: list[tuple[str, Any]] = []
    for key in ALIASES[name]:
        if values.get(key) is None:
            continue
        try:
            value = _CHECKS[name](values[key])
        except ConfigError as error:
            protocol.problems.setdefault(name, f"{side} {key}: {error}")
            continue
        if value is not None:
            found.append((key, value))
    if not found:
        return None, None
    if len({v for _, v in found}) > 1:
        protocol.problems.setdefault(name, f"{side} gives {', '.join(f'{k}={v}' for k, v in found)}; using "
                                           f"{found[0][0]}")
    return found[0][1], found[0][0]


def protocol_of(metrics: Mapping[str, Any] | None, config: Mapping[str, Any] | None = None,
                declared: Mapping[str, Any] | None = None) -> ClientProtocol:
    """The protocol a client ran, from its reply ``metrics`` (preferred: what the client
    says it did), the train ``config`` the strategy sent (what it was asked to do) and what
    the server ``declared`` it knows (its run config, or :func:`training_config`'s entries),
    each read under every name of :data:`ALIASES`. Never raises on the values: a refused or
    missing value is unknown, with its reason."""
    sides = {"metrics": dict(metrics or {}), "config": dict(config or {}), "declared": dict(declared or {})}
    protocol = ClientProtocol()
    for name in ("num_examples", *(n for n in _CHECKS if n != "num_examples")):
        read = {side: _read(name, side, values, protocol) for side, values in sides.items()
                if side in _SIDES.get(name, sides)}
        side = next((side for side, (value, _) in read.items() if value is not None), None)
        value, key = read[side] if side is not None else (None, None)
        if side is not None:
            cap = protocol.num_examples if name == "batch_size" and protocol.num_examples else None
            for other, (theirs, _) in read.items():    # a minibatch larger than the data is the data (cap)
                if other != side and theirs is not None and (min(theirs, cap) != min(value, cap) if cap else
                                                             theirs != value):
                    protocol.problems.setdefault(name, f"{_SAYS[side]} {value}, {_SAYS[other]} {theirs}; using "
                                                       f"the {_OWNER[side]} value")
        setattr(protocol, name, value)
        protocol.sources[name] = side or "unknown"
        if key is not None:
            protocol.keys[name] = key
    mode = sides["metrics"].get(TRAIN_MODE)
    if mode in (0, 1) and not isinstance(mode, bool) and isinstance(mode, int):
        protocol.mode, protocol.sources["mode"] = ("train" if mode == 1 else "eval"), "metrics"
    else:
        protocol.sources["mode"] = "unknown"
        if mode is not None:
            protocol.problems["mode"] = f"metrics {TRAIN_MODE} must be 0 or 1, got {short_repr(mode)}"
    _complete_steps(protocol)
    return protocol


def check_declared(declared: Mapping[str, Any], where: str = "protocol") -> dict[str, Any]:
    """What a server declares it knows of its clients' training (its run config, or
    :func:`training_config`'s entries), checked: a ConfigError names a refused value (this is
    the auditor's own input, not a client's). Entries under other keys are ignored."""
    if not isinstance(declared, Mapping):
        raise ConfigError(f"{where}: expected a mapping of training settings (e.g. training_config(...) or "
                          f"context.run_config), got {type(declared).__name__}")
    probe = ClientProtocol()
    for name in _CHECKS:
        _read(name, "declared", declared, probe)
    if probe.problems:
        name, problem = next(iter(probe.problems.items()))
        raise ConfigError(f"{where}: {name}: {problem}")
    return dict(declared)


def _complete_steps(protocol: ClientProtocol) -> None:
    """Minibatch size at most the number of examples; local steps from epochs when not given."""
    n, b = protocol.num_examples, protocol.batch_size
    if n is not None and b is not None and b > n:
        protocol.batch_size = n
    if protocol.local_steps is None and protocol.epochs is not None and n is not None and b is not None:
        steps = protocol.epochs * math.ceil(n / protocol.batch_size)
        if steps <= MAX_ITERATIONS:
            protocol.local_steps, protocol.sources["local_steps"] = steps, "computed"
        else:
            protocol.problems["local_steps"] = f"{protocol.epochs} epochs of {n} examples in minibatches of {b} " \
                                               f"are {steps:,} steps, over the limit of {MAX_ITERATIONS:,}"
    elif protocol.local_steps is not None and protocol.epochs is not None and n is not None and b is not None:
        expected = protocol.epochs * math.ceil(n / protocol.batch_size)
        if expected != protocol.local_steps:
            protocol.problems.setdefault("local_steps", f"{protocol.local_steps} local steps given, but {protocol.epochs} "
                                                        f"epoch(s) of {n} examples in minibatches of {b} are {expected}")
