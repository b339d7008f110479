"""What every defense shares: the ``Defense`` base class, its three stages, and the registry.

A defense is a small frozen dataclass with a name, the paper it comes from, and the stage
of the federated pipeline it acts on:

- ``client``: changes how the client trains before it shares anything (DP-SGD and
  per-example clipping through Opacus, FedAvg local steps as a protocol defense). Hooks:
  :meth:`Defense.configure` (the client's protocol) and :meth:`Defense.private_training`
  (per-example clipping and noise).
- ``update``: transforms the update the client sends (noise, clipping, pruning, masking,
  quantisation, Soteria). Hook: :meth:`Defense.apply`, which may read the client's own
  data through the :class:`ClientContext` (the client has it; the attacker never does).
- ``aggregate``: changes what the server sees of several clients (secure aggregation).
  Hook: :meth:`Defense.aggregate`.

Defenses compose: :func:`gradleak.defenses.defended_updates` runs the client stage, then
the update stage in the order given, then the aggregation stage. Each defense is
described by :meth:`Defense.describe` (JSON) and :meth:`Defense.label` (one line), and
built from a spec string or mapping by :func:`make_defense`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..client import ClientSetup
from ..data.spec import DataSpec
from ..errors import ConfigError, GradleakError
from ..limits import check_float, check_int, short_repr
from ..registry import Registry
from ..update import SharedUpdate

__all__ = ["Defense", "ClientContext", "PrivateTraining", "DEFENSES", "register_defense", "get_defense",
           "make_defense", "make_defenses", "STAGES", "stack_label"]

STAGES = ("client", "update", "aggregate")


@dataclass(frozen=True)
class ClientContext:
    """What the client has while it defends its update: the model, its own batch, its seed."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    spec: DataSpec
    loss: str
    seed: int


@dataclass(frozen=True)
class PrivateTraining:
    """Per-example clipping to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` on the sum, as DP-SGD (Abadi et al. 2016) does it.

    ``noise_multiplier`` is given, or derived by Opacus from ``epsilon``/``delta`` for the
    client's sampling rate and the number of steps over ``rounds`` rounds."""

    max_grad_norm: float
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    rounds: int = 1
    accountant: str = "rdp"


class Defense:
    """Base class of every defense (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    stage: ClassVar[str] = "update"

    def configure(self, setup: ClientSetup) -> ClientSetup:
        """Client stage: the protocol the client runs under this defense."""
        return setup

    def private_training(self) -> PrivateTraining | None:
        """Client stage: per-example clipping and noise (DP-SGD), or None."""
        return None

    def apply(self, update: SharedUpdate, context: ClientContext, generator: torch.Generator) -> SharedUpdate:
        """Update stage: the update as the client sends it after this defense."""
        return update

    def aggregate(self, updates: Sequence[SharedUpdate]) -> list[list[int]]:
        """Aggregation stage: groups of client indices whose updates the server sees only summed."""
        return [[k] for k in range(len(updates))]

    # ------------------------------------------------------------------ descriptions
    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    def describe(self) -> dict[str, Any]:
        """JSON description: ``{"name": ..., **parameters}`` (what :func:`make_defense` reads back)."""
        return {"name": self.name, **{k: v for k, v in self.params().items() if v is not None}}

    def label(self) -> str:
        """One line for tables and plots, e.g. ``gaussian(variance=0.01)``: the first parameter
        and those that differ from their defaults (all of them are in :meth:`describe`)."""
        fields = dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()
        defaults = {f.name: f.default for f in fields[1:]}
        params = ", ".join(f"{k}={_short(v)}" for k, v in self.params().items()
                           if v is not None and (k not in defaults or v != defaults[k]))
        return f"{self.name}({params})" if params else self.name


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def positive(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, > 0 (or >= 0) and finite; else a ConfigError naming ``owner: name``."""
    return check_float(f"{owner}: {name}", value, low_open=not allow_zero)


def count(owner: str, name: str, value: Any) -> int:
    """``value`` as a positive int (up to 2**63 - 1); else a ConfigError naming ``owner: name``."""
    return check_int(f"{owner}: {name}", value, 1, 2**63 - 1)


def fraction(owner: str, name: str, value: Any) -> float:
    """``value`` as a float in [0, 1); else a ConfigError naming ``owner.name``."""
    value = positive(owner, name, value, allow_zero=True)
    if value >= 1:
        raise ConfigError(f"{owner}: {name} must be in [0, 1), got {short_repr(value)}")
    return value


def one_of(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {', '.join(map(str, choices))}; got {short_repr(value)}")
    return value


DEFENSES: Registry[type[Defense]] = Registry(
    "defense", lambda cls: None if cls.stage in STAGES else f"a defense needs a stage in {STAGES}, got {cls.stage!r}")


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a defense available by its ``name`` (specs, CLI, audits)."""
    return DEFENSES.register(cls)


def get_defense(name: str) -> type[Defense]:
    """The defense class registered as ``name``; a ConfigError listing the known names otherwise."""
    return DEFENSES.lookup(name)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_defense(spec: Defense | str | Mapping[str, Any]) -> Defense | None:
    """A defense from a spec: an instance, ``"none"``, ``"name"``, ``"name:key=value,key=value"``
    or a mapping ``{"name": ..., key: value}``. ``"none"`` gives None (no defense)."""
    if isinstance(spec, Defense):
        return spec
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        options: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"defense spec {spec!r}: expected name:key=value,key=value")
            options[key.strip()] = _parse_value(value.strip())
    elif isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"defense spec {dict(spec)!r}: needs a 'name'")
    else:
        raise ConfigError(f"a defense is a name, 'name:key=value,...', a mapping or a Defense; got {spec!r}")
    if name.strip().lower() in ("none", ""):
        if options:
            raise ConfigError(f"defense 'none' takes no options, got {options}")
        return None
    cls = get_defense(name.strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"defense {name!r}: unknown option {unknown[0]!r}; options: {', '.join(sorted(fields)) or 'none'}")
    return cls(**options)


def make_defenses(specs: Defense | str | Mapping[str, Any] | Sequence[Any] | None) -> list[Defense]:
    """A list of defenses applied together, from one spec or a list of specs (``none`` dropped)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping, Defense)):
        specs = [specs]
    defenses = [d for d in (make_defense(s) for s in specs) if d is not None]
    private = [d for d in defenses if d.private_training() is not None]
    if len(private) > 1:
        raise ConfigError(f"at most one of dp-sgd / per-example-clipping per client, got {[d.label() for d in private]}")
    if sum(d.stage == "aggregate" for d in defenses) > 1:
        raise ConfigError("at most one aggregation defense (secure-aggregation) per stack")
    return defenses


def stack_label(described: Any) -> str:
    """``"pruning(ratio=0.3) + half"``: a stack of defenses as recorded in a run's config.json
    (:meth:`Defense.describe` dicts), for titles and summary lines; ``"no defense"`` when empty.
    A record that no longer parses (an old or edited file) is shown by its name."""
    if not isinstance(described, (list, tuple)) or not described:
        return "no defense"
    labels = []
    for entry in described:
        try:
            defense = make_defense(entry)
            labels.append(defense.label() if defense is not None else "none")
        except (GradleakError, TypeError, ValueError):
            labels.append(str(entry.get("name", "?")) if isinstance(entry, Mapping) else str(entry)[:40])
    return " + ".join(labels)
