"""Bounds on what untrusted or careless input may ask for, checked before anything is allocated.

Update files, audit configs, weights files and command lines all end up asking gradleak to
build tensors. Every size that reaches an allocation passes one of these checks first, so a
hostile file gets a one-line :class:`~gradleak.errors.ConfigError` naming the value instead
of a 480 GB allocation. The limits are generous for the field (224/299-px ImageNet inputs,
batches of a few hundred) and documented in ``docs/hardening.md``.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, one_line

__all__ = [
    "MAX_SIDE", "MAX_INPUT_ELEMENTS", "MAX_BATCH", "MAX_BATCH_ELEMENTS", "MAX_SEED", "MAX_RESTARTS",
    "MAX_ITERATIONS", "MAX_CLASSES", "MAX_PARAMETERS", "Limit", "LIMITS", "check_pixels", "check_nesting",
    "short_repr", "one_line", "check_bool", "check_int", "check_float", "check_input_shape", "check_seed", "check_batch",
]

MAX_SIDE = 4096                 # pixels per side of one input (ImageNet models use 224-299)
MAX_INPUT_ELEMENTS = 2**24      # C*H*W of one input (3 x 2364 x 2364)
MAX_BATCH = 4096                # samples in one update
MAX_BATCH_ELEMENTS = 2**28      # B*C*H*W of a candidate batch (1 GiB in float32)
MAX_SEED = 2**63 - 1            # torch.manual_seed accepts [-2**63, 2**64); we take [0, 2**63)
MAX_RESTARTS = 256              # restarts of an optimisation attack
MAX_ITERATIONS = 10_000_000     # iterations of an optimisation attack
MAX_CLASSES = 100_000           # classifier outputs
MAX_PARAMETERS = 2**31          # parameters of a model built from a description (8 GiB in float32)


@dataclass(frozen=True)
class Limit:
    """One bound that every command, config key and function naming the same quantity shares:
    ``--size`` of ``attack``, ``capture``, ``demo`` and ``train``, ``data.size`` of an audit
    config and ``DataRequest.size`` are all :data:`LIMITS` ``["side"]``."""

    name: str
    low: int
    high: int
    what: str

    def check(self, value: Any, where: str | None = None) -> int:
        """``value`` within ``[low, high]`` (an int, not a bool); else a ConfigError naming ``where``."""
        return check_int(where or self.name, value, self.low, self.high)

    @property
    def range(self) -> str:
        return f"{self.low:,}..{self.high:,}"


LIMITS: dict[str, Limit] = {limit.name: limit for limit in (
    Limit("side", 4, 512, "pixels per side of images resized for a run (--size, data.size, utility.size)"),
    Limit("images", 1, 100_000, "images a run loads or attacks (--n, data.n)"),
    Limit("start", 0, 100_000, "index of the first image (--start)"),
    Limit("batch", 1, MAX_BATCH, "images in one attacked update (batch_sizes, capture --n, analyze --batch-size)"),
    Limit("epochs", 1, 100_000, "training epochs or federated rounds (--epochs, utility.rounds, eval_every)"),
    Limit("clients", 1, 10_000, "federated clients of a training (--clients)"),
    Limit("local_steps", 1, 100_000, "local SGD steps of a FedAvg client"),
    Limit("local_epochs", 1, 10_000, "local epochs of a FedAvg client"),
    Limit("local_batch", 1, 2**20, "images a simulated client holds or trains on per step (train --batch-size, "
                                   "--client batch_size, local_batch_size)"),
    Limit("restarts", 1, MAX_RESTARTS, "restarts of an optimisation attack"),
    Limit("iterations", 1, MAX_ITERATIONS, "iterations of an optimisation attack"),
    Limit("classes", 1, MAX_CLASSES, "classifier outputs (--num-classes)"),
    Limit("workers", 1, 1024, "worker processes or Ray CPUs (--jobs, --workers, --threads)"),
    Limit("steps", 1, 100_000, "L-BFGS steps or evaluations of a study (--steps, --inner)"),
)}


def check_pixels(where: str, count: int, channels: int, side: int) -> None:
    """``count`` images of ``channels`` x ``side`` x ``side`` stay within :data:`MAX_BATCH_ELEMENTS`
    values (1 GiB in float32): checked before images are decoded or resized."""
    values = count * channels * side * side
    if values > MAX_BATCH_ELEMENTS:
        raise ConfigError(f"{where}: {count:,} images of {channels}x{side}x{side} are {values:,} values, over the "
                          f"limit of {MAX_BATCH_ELEMENTS:,} (fewer images or a smaller size)")


def check_int(where: str, value: Any, low: int, high: int) -> int:
    """``value`` is an int (not a bool) in ``[low, high]``; else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer in {low}..{high}, got {short_repr(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in {low}..{high}, got {short_repr(value)}")
    return value


def check_bool(where: str, value: Any) -> bool:
    """``value`` is True or False (not 0/1, not a string); else a ConfigError naming ``where``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {short_repr(value)}")
    return value


def check_seed(where: str, value: Any) -> int:
    return check_int(where, value, 0, MAX_SEED)


def check_input_shape(where: str, shape: Any) -> tuple[int, ...]:
    """One input's shape, e.g. (C, H, W): 1-4 positive ints, each side <= MAX_SIDE (channels and
    flat features may be larger), C*H*W <= MAX_INPUT_ELEMENTS."""
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 4:
        raise ConfigError(f"{where} must be 1 to 4 positive integers such as (3, 32, 32), got {short_repr(shape)}")
    dims = tuple(check_int(f"{where}[{k}]", d, 1, MAX_INPUT_ELEMENTS) for k, d in enumerate(shape))
    if len(dims) >= 3 and max(dims[-2:]) > MAX_SIDE:
        raise ConfigError(f"{where}: an image side of {max(dims[-2:])} pixels exceeds the limit of {MAX_SIDE}")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise ConfigError(f"{where}: {math.prod(dims):,} values per input exceeds the limit of {MAX_INPUT_ELEMENTS:,}")
    return dims


def check_batch(where: str, batch: int, input_shape: tuple[int, ...] | None) -> int:
    """A batch size within MAX_BATCH whose candidate batch stays within MAX_BATCH_ELEMENTS."""
    check_int(where, batch, 1, MAX_BATCH)
    if input_shape is not None and batch * math.prod(input_shape) > MAX_BATCH_ELEMENTS:
        raise ConfigError(f"{where}: a batch of {batch} inputs of shape {tuple(input_shape)} is "
                          f"{batch * math.prod(input_shape):,} values, over the limit of {MAX_BATCH_ELEMENTS:,}")
    return batch


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short_repr(value: Any, limit: int = 120) -> str:
    """A short one-line repr of ``value`` for a message: long strings, lists and nesting cut
    (:mod:`reprlib`), huge integers described by their size (a 5,000-digit integer has no
    repr in Python 3.11+), never more than ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return one_line(_REPR.repr(value), limit)
    except Exception:  # noqa: BLE001 - a repr that fails (e.g. a huge int nested in a list): name the type
        return f"a {type(value).__name__}"


def check_float(where: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
                optional: bool = False) -> float | None:
    """A finite real number (int or float, not bool) in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if value is None and optional:
        return None
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = None
    if number is None or not math.isfinite(number) or number < low or (low_open and number == low) or number > high:
        if math.isinf(high):
            bound = f"{'>' if low_open else '>='} {low:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{where} must be a finite number {bound}{' or None' if optional else ''}, "
                          f"got {short_repr(value)}")
    return number


MAX_NESTING = 32            # lists/mappings inside one another in metadata or a config (a config needs ~6)
MAX_VALUES = 100_000        # values in one metadata record


def check_nesting(where: str, value: Any, max_depth: int = MAX_NESTING, max_values: int = MAX_VALUES) -> None:
    """JSON-like ``value`` nests at most ``max_depth`` lists/mappings deep and holds at most
    ``max_values`` values: walked iteratively, so a 900-deep list is one ConfigError line here
    instead of a RecursionError later (when it is copied, compared or written)."""
    stack = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > max_values:
            raise ConfigError(f"{where}: more than {max_values:,} values")
        if isinstance(item, (list, tuple, dict)):
            if depth > max_depth:
                raise ConfigError(f"{where}: nested more than {max_depth} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
