"""The audit's configuration: a grid of models x attacks x defenses x batch sizes over real images.

Read from YAML or TOML (:func:`load_audit_config`) or built in Python
(:class:`AuditConfig`). Every value is checked before anything runs, and a bad one is
named by its key (``defenses[3]: unknown defense 'gausian'``). A YAML example::

    name: LeNet under DLG's defenses
    data: {name: photos, n: 4, size: 32}
    models: [lenet, mlp]                  # zoo names, or {name: ..., options: {...}}
    attacks:
      - {name: dlg, options: {iterations: 100}}
      - {name: fc-bias, models: [mlp]}    # only on these models
    defenses:                             # one grid value each; a list stacks defenses
      - none
      - gaussian:variance=1e-2
      - {name: pruning, ratio: 0.2}
      - [pruning:ratio=0.2, half]
    batch_sizes: [1]
    client: {protocol: fedsgd}            # ClientSetup fields (lr, local_steps, ...)
    threat: {labels_known: false}
    utility: {data: digits, model: mlp, clients: 10, rounds: 50, server_lr: 0.5}   # or false
    verdict: {recognisable_psnr: 18, partial_psnr: 14}   # optional: recognisable_ssim, partial_ssim

A ``dp-sgd`` defense without ``rounds`` has its budget spread over the utility training's
``rounds``, in the attack cells too. With FedSGD both the attacked client and the training
clients use their whole batch (q = 1, one step per round), so both get the same noise
multiplier; with FedAvg minibatches q and the steps differ, and each reports its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..client import ClientSetup
from ..errors import ConfigError

__all__ = ["AuditConfig", "ModelChoice", "AttackChoice", "UtilityConfig", "VerdictRule", "load_audit_config",
           "stable_hash"]


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value (keys sorted): the identity of a cell on disk."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _named(where: str, entry: Any, extra_keys: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, options, other allowed keys) from ``"name"`` or ``{name: ..., options: {...}, ...}``."""
    if isinstance(entry, str) and entry.strip():
        return entry.strip(), {}, {}
    if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        allowed = ("name", "options", *extra_keys)
        extra = sorted(set(entry) - set(allowed))
        if extra:
            raise ConfigError(f"{where}: unknown key {extra[0]!r} (expected {', '.join(allowed)})")
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.options: expected a mapping, got {options!r}")
        return entry["name"], dict(options), {k: entry[k] for k in extra_keys if k in entry}
    raise ConfigError(f"{where}: expected a name or {{name: ..., options: {{...}}}}, got {entry!r}")


@dataclass(frozen=True)
class ModelChoice:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name + ("(" + ",".join(f"{k}={v}" for k, v in self.options.items()) + ")" if self.options else "")


@dataclass(frozen=True)
class AttackChoice:
    """An attack with its options; ``models`` restricts it to some of the audit's models
    (by zoo name), e.g. a closed-form attack to the architectures it applies to."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None

    def applies_to(self, model: "ModelChoice") -> bool:
        return self.models is None or model.name in self.models

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class UtilityConfig:
    """Federated training for the accuracy axis (see :func:`gradleak.federated.train_federated`)."""

    data: str = "digits"
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    clients: int = 10
    rounds: int = 50
    server_lr: float = 0.5
    test_fraction: float = 0.2
    eval_every: int = 5
    protocol: str | None = None          # default: the audit's client protocol
    lr: float | None = None
    local_steps: int | None = None
    local_batch_size: int | None = None

    def __post_init__(self):
        from ..defenses.base import count, fraction, positive

        for name in ("clients", "rounds", "eval_every"):
            count("utility", name, getattr(self, name))
        for name in ("local_steps", "local_batch_size"):
            if getattr(self, name) is not None:
                count("utility", name, getattr(self, name))
        positive("utility", "server_lr", self.server_lr)
        if self.lr is not None:
            positive("utility", "lr", self.lr)
        if not 0 < fraction("utility", "test_fraction", self.test_fraction):
            raise ConfigError(f"utility: test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.protocol not in (None, "fedsgd", "fedavg"):
            raise ConfigError(f"utility: protocol must be fedsgd or fedavg, got {self.protocol!r}")
        if not isinstance(self.model_options, Mapping):
            raise ConfigError(f"utility: model_options must be a mapping, got {self.model_options!r}")


@dataclass(frozen=True)
class VerdictRule:
    """Per image: PSNR >= ``recognisable_psnr`` is a recognisable reconstruction, >= ``partial_psnr``
    partial structure. Optionally SSIM too: an image then counts at the higher of the two levels.

    PSNR punishes noise that the eye sees through (DLG through variance-1e-4 noise: 12-21 dB,
    every photo recognisable; ``docs/defenses.md``), so ``recognisable_ssim`` / ``partial_ssim``
    let a structural criterion raise such images; they are off (None) by default."""

    recognisable_psnr: float = 18.0
    partial_psnr: float = 14.0
    recognisable_ssim: float | None = None
    partial_ssim: float | None = None

    def __post_init__(self):
        from ..defenses.base import positive

        if positive("verdict", "partial_psnr", self.partial_psnr) > positive("verdict", "recognisable_psnr",
                                                                             self.recognisable_psnr):
            raise ConfigError(f"verdict: partial_psnr ({self.partial_psnr}) must not exceed recognisable_psnr "
                              f"({self.recognisable_psnr})")
        for name in ("recognisable_ssim", "partial_ssim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise ConfigError(f"verdict: {name} must be in (0, 1] (SSIM), got {value!r}")
        if None not in (self.recognisable_ssim, self.partial_ssim) and self.partial_ssim > self.recognisable_ssim:
            raise ConfigError(f"verdict: partial_ssim ({self.partial_ssim}) must not exceed recognisable_ssim "
                              f"({self.recognisable_ssim})")

    def level(self, psnr: float | None, ssim: float | None = None) -> str:
        """"recognisable", "partial" or "none" for one image (None: not recovered)."""
        ranks = [0]
        if psnr is not None and psnr == psnr:
            ranks.append(2 if psnr >= self.recognisable_psnr else 1 if psnr >= self.partial_psnr else 0)
        if ssim is not None and ssim == ssim:
            ranks.append(2 if self.recognisable_ssim is not None and ssim >= self.recognisable_ssim else
                         1 if self.partial_ssim is not None and ssim >= self.partial_ssim else 0)
        return ("none", "partial", "recognisable")[max(ranks)]

    def describe(self, level: str = "recognisable") -> str:
        """The criterion in words: ``PSNR >= 18 dB`` or ``PSNR >= 18 dB or SSIM >= 0.5``."""
        psnr, ssim = ((self.recognisable_psnr, self.recognisable_ssim) if level == "recognisable" else
                      (self.partial_psnr, self.partial_ssim))
        return f"PSNR >= {psnr:g} dB" + (f" or SSIM >= {ssim:g}" if ssim is not None else "")


@dataclass(frozen=True)
class AuditConfig:
    """What an audit runs. ``defenses`` holds one entry per grid value, each a list of specs
    stacked on one client (``[]`` is "no defense")."""

    models: tuple[ModelChoice, ...]
    attacks: tuple[AttackChoice, ...]
    defenses: tuple[tuple[Any, ...], ...] = ((),)
    batch_sizes: tuple[int, ...] = (1,)
    data: dict[str, Any] = field(default_factory=lambda: {"name": "photos", "n": 4, "size": 32})
    client: dict[str, Any] = field(default_factory=dict)
    threat: dict[str, Any] = field(default_factory=dict)
    utility: UtilityConfig | None = field(default_factory=UtilityConfig)
    verdict: VerdictRule = field(default_factory=VerdictRule)
    name: str = "gradleak audit"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        from ..attacks import ATTACKS
        from ..defenses import make_defenses
        from ..models import MODELS

        if not self.models or not self.attacks or not self.defenses or not self.batch_sizes:
            raise ConfigError("an audit needs at least one model, attack, defense entry (none allowed) and batch size")
        for k, m in enumerate(self.models):
            if m.name not in MODELS:
                raise ConfigError(f"models[{k}]: unknown model {m.name!r}; known: {', '.join(MODELS)}")
        names = {m.name for m in self.models}
        for k, a in enumerate(self.attacks):
            if a.name not in ATTACKS:
                raise ConfigError(f"attacks[{k}]: unknown attack {a.name!r}; known: {', '.join(sorted(ATTACKS))}")
            missing = sorted(set(a.models or ()) - names)
            if missing:
                raise ConfigError(f"attacks[{k}].models: {missing[0]!r} is not one of the audit's models "
                                  f"({', '.join(sorted(names))})")
        for k, b in enumerate(self.batch_sizes):
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ConfigError(f"batch_sizes[{k}]: must be a positive integer, got {b!r}")
        n = self.data.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"data.n: the number of images to attack must be a positive integer, got {n!r}")
        for k, entry in enumerate(self.defenses):
            try:
                stack = make_defenses(list(entry))
            except ConfigError as error:
                raise ConfigError(f"defenses[{k}]: {error}") from None
            group = next((d.clients for d in stack if d.stage == "aggregate"), 1)
            for b in self.batch_sizes:
                if n % (b * group):
                    raise ConfigError(f"defenses[{k}] with batch size {b}: data.n={n} images do not split into "
                                      f"clients of {b} image(s) aggregated in groups of {group}")
        try:
            ClientSetup(**{**self.client, "batch_size": 1})
        except TypeError as error:
            raise ConfigError(f"client: {error}") from None
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")
        self._check_attack_options()

    def _check_attack_options(self) -> None:
        """Build every (model, attack) once, so that a bad model or attack option (or threat
        key) is refused now, naming it, rather than after hours of other cells."""
        from ..models import build_model
        from ..pipeline import make_attack
        from ..threat import ThreatModel

        try:
            threat = ThreatModel(**self.threat)
        except TypeError as error:
            raise ConfigError(f"threat: {error}") from None
        size = self.data.get("size") or 32
        channels = 1 if self.data.get("name") in ("faces", "digits") else 3
        for k, model in enumerate(self.models):
            try:
                net = build_model(model.name, (channels, size, size), 10, **model.options)
            except ConfigError as error:
                raise ConfigError(f"models[{k}]: {error}") from None
            for j, attack in enumerate(self.attacks):
                if attack.applies_to(model):
                    try:
                        make_attack(attack.name, net, threat, dict(attack.options))
                    except ConfigError as error:
                        raise ConfigError(f"attacks[{j}]: {error}") from None

    def defense_stacks(self) -> list[list[Any]]:
        """Each grid value's defenses, with DP budgets spread over the utility rounds."""
        from ..defenses import make_defenses

        stacks = []
        for entry in self.defenses:
            stack = make_defenses(list(entry))
            if self.utility is not None:
                stack = [dataclasses.replace(d, rounds=self.utility.rounds)
                         if d.name == "dp-sgd" and d.rounds is None else d for d in stack]
            stacks.append(stack)
        return stacks

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["defenses"] = [[d.describe() for d in stack] for stack in self.defense_stacks()]
        return out

    # ------------------------------------------------------------------ from mappings
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "AuditConfig":
        _check_keys("the audit config", raw, cls)
        for key in ("models", "attacks"):
            if key not in raw:
                raise ConfigError(f"the audit config needs {key!r}")
        values: dict[str, Any] = {k: raw[k] for k in ("name", "seed", "dtype") if k in raw}
        values["models"] = tuple(ModelChoice(*_named(f"models[{k}]", m)[:2]) for k, m in enumerate(_list(raw, "models")))
        attacks = []
        for k, entry in enumerate(_list(raw, "attacks")):
            name, options, extra = _named(f"attacks[{k}]", entry, ("models",))
            models = extra.get("models")
            if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
                raise ConfigError(f"attacks[{k}].models: expected a list of model names, got {models!r}")
            attacks.append(AttackChoice(name, options, None if models is None else tuple(models)))
        values["attacks"] = tuple(attacks)
        if "defenses" in raw:
            values["defenses"] = tuple(tuple(d if isinstance(d, list) else [d]) for d in _list(raw, "defenses"))
        if "batch_sizes" in raw:
            values["batch_sizes"] = tuple(_list(raw, "batch_sizes"))
        for key in ("data", "client", "threat"):
            if key in raw:
                if not isinstance(raw[key], Mapping):
                    raise ConfigError(f"{key}: expected a mapping, got {raw[key]!r}")
                values[key] = dict(raw[key])
        if "data" in values:
            values["data"] = {"name": "photos", "n": 4, "size": 32, **values["data"]}
        if "utility" in raw:
            values["utility"] = None if raw["utility"] in (False, None) else _sub(UtilityConfig, "utility", raw["utility"])
        if "verdict" in raw:
            values["verdict"] = _sub(VerdictRule, "verdict", raw["verdict"])
        return cls(**values)


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw[key]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
    return value


def _check_keys(where: str, value: Any, cls) -> None:
    """``value`` is a mapping whose keys are fields of the dataclass ``cls``; else name the first stranger."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(known))}")


def _sub(cls, key: str, value: Any):
    _check_keys(key, value, cls)
    return cls(**value)


def load_audit_config(path: str | Path) -> AuditConfig:
    """An :class:`AuditConfig` from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"audit config {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"audit config {str(path)!r}: expected a .yaml, .yml or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as error:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"audit config {str(path)!r} does not parse: {error}") from None
    return AuditConfig.from_mapping(raw)
