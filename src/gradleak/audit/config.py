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

The file is untrusted input and bounded (``gradleak.audit._parse``, ``gradleak.audit._checks``):
at most 1 MiB of UTF-8; at most 100,000 values and 1,000,000 characters counting every YAML
alias where it is used; nesting at most 32 deep; integers within 64 bits, no NaN; data.n at
most 100,000 (and n x 3 x size x size at most 2**28), data.size and utility.size 4..512,
batch sizes at most 4096, utility rounds/clients/eval_every at most 100,000, the grid at most
100,000 cells, the name one line of at most 200 characters, seed in 0..2**63-1.

A ``dp-sgd`` defense without ``rounds`` has its budget spread over the utility training's
``rounds``, in the attack cells too. With FedSGD both the attacked client and the training
clients use their whole batch (q = 1, one step per round), so both get the same noise
multiplier; with FedAvg minibatches q and the steps differ, and each reports its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..client import ClientSetup
from ..errors import ConfigError, one_line
from ..limits import MAX_SEED
from ..names import model_name, normalize
from ._checks import MAX_BATCH, MAX_COUNT, MAX_GRID, MAX_NAME, check_data, check_tree, count, integer
from ._checks import check_keys as _check_keys
from ._checks import named_entry as _named
from ._checks import named_errors as _named_errors
from ._checks import nonempty_list as _list
from ._checks import number, show, side, sorted_keys, source, str_keyed, text
from ._models import ModelChoice, check_imports, resolve_weights
from .verdict import VerdictRule
from ._parse import parse_config, read_config

__all__ = ["AuditConfig", "ModelChoice", "AttackChoice", "UtilityConfig", "VerdictRule", "load_audit_config",
           "stable_hash"]


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value (keys sorted): the identity of a cell on disk."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
        from ..models import MODELS

        source("utility: data", self.data)
        if isinstance(self.model, str):
            object.__setattr__(self, "model", normalize(self.model, "utility: model"))
        if not isinstance(self.model, str) or self.model not in MODELS:
            raise ConfigError(f"utility: model must be one of {', '.join(MODELS)}, got {show(self.model)}")
        str_keyed("utility: model_options", self.model_options)
        side("utility: size", self.size)
        for name in ("clients", "rounds", "eval_every"):
            count(f"utility: {name}", getattr(self, name), MAX_COUNT)
        for name, high in (("local_steps", ClientSetup.MAX_STEPS), ("local_batch_size", ClientSetup.MAX_BATCH)):
            if getattr(self, name) is not None:
                count(f"utility: {name}", getattr(self, name), high)
        number("utility: server_lr", self.server_lr)
        if self.lr is not None:
            number("utility: lr", self.lr)
        if number("utility: test_fraction", self.test_fraction) >= 1:
            raise ConfigError(f"utility: test_fraction must be in (0, 1), got {show(self.test_fraction)}")
        if self.protocol is not None and (not isinstance(self.protocol, str) or self.protocol not in ("fedsgd", "fedavg")):
            raise ConfigError(f"utility: protocol must be fedsgd or fedavg, got {show(self.protocol)}")


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
    device: str = "auto"

    def __post_init__(self):
        """Check every value, cheapest first, before anything is built, run or written."""
        text("name:", self.name, MAX_NAME, one_line_only=True)
        integer("seed:", self.seed, 0, MAX_SEED)
        if not isinstance(self.dtype, str) or self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype: must be float32 or float64, got {show(self.dtype)}")
        from ..models import resolve_device

        with _named_errors("device"):
            resolve_device(self.device)
        for where, value in (("data", self.data), ("client", self.client), ("threat", self.threat)):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping, got {show(value)}")
            check_tree(value, where)
        check_data(self.data)
        self._check_grid()
        self._check_defenses()
        self._check_client()
        self._check_utility()
        if not isinstance(self.verdict, VerdictRule):
            raise ConfigError(f"verdict: expected a VerdictRule, got {show(self.verdict)}")
        self._check_attack_options()

    def _check_grid(self) -> None:
        """Models and attacks by zoo name with string-keyed options, batch sizes, the grid's size."""
        from ..attacks import ATTACKS
        from ..models import MODELS

        for key in ("models", "attacks", "defenses", "batch_sizes"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or not value:
                raise ConfigError(f"{key}: expected a non-empty list, got {show(value)}")
        cells = len(self.models) * len(self.attacks) * len(self.defenses) * len(self.batch_sizes)
        if cells > MAX_GRID:
            raise ConfigError(f"the audit grid (models x attacks x defenses x batch_sizes) has {cells:,} cells; "
                              f"the limit is {MAX_GRID:,}")
        for k, m in enumerate(self.models):
            if not isinstance(m, ModelChoice):
                raise ConfigError(f"models[{k}]: expected a ModelChoice, got {show(m)}; known models: {', '.join(MODELS)}")
            m.check(f"models[{k}]")
            if m.train is not None:
                with _named_errors(f"models[{k}].train"):
                    m.training(self.data, self.seed)
            check_tree(str_keyed(f"models[{k}].options", m.options), f"models[{k}].options")
        names = {m.name for m in self.models}
        for k, a in enumerate(self.attacks):
            if not isinstance(a, AttackChoice) or not isinstance(a.name, str) or a.name not in ATTACKS:
                raise ConfigError(f"attacks[{k}]: unknown attack {show(getattr(a, 'name', a))}; "
                                  f"known: {', '.join(sorted(ATTACKS))}")
            check_tree(str_keyed(f"attacks[{k}].options", a.options), f"attacks[{k}].options")
            if a.models is not None and (not isinstance(a.models, (tuple, list))
                                         or not all(isinstance(m, str) for m in a.models)):
                raise ConfigError(f"attacks[{k}].models: expected a list of model names, got {show(a.models)}")
            missing = sorted(set(a.models or ()) - names)
            if missing:
                raise ConfigError(f"attacks[{k}].models: {missing[0]!r} is not one of the audit's models "
                                  f"({', '.join(sorted(names))})")
        for k, b in enumerate(self.batch_sizes):
            count(f"batch_sizes[{k}]:", b, MAX_BATCH)

    def _check_defenses(self) -> None:
        """Every grid value's defense stack builds, and its clients split the images."""
        from ..defenses import make_defenses

        n = self.data["n"]
        for k, entry in enumerate(self.defenses):
            if not isinstance(entry, (tuple, list)):
                raise ConfigError(f"defenses[{k}]: expected a list of defense specs, got {show(entry)}")
            check_tree(list(entry), f"defenses[{k}]")
            try:
                stack = make_defenses(list(entry))
            except ConfigError as error:
                raise ConfigError(f"defenses[{k}]: {one_line(error, 300)}") from None
            except (TypeError, ValueError, OverflowError) as error:
                raise ConfigError(f"defenses[{k}]: not a valid defense spec ({one_line(error, 200)})") from None
            group = next((d.clients for d in stack if d.stage == "aggregate"), 1)
            for b in self.batch_sizes:
                if n % (b * group):
                    raise ConfigError(f"defenses[{k}] with batch size {b}: data.n={n} images do not split into "
                                      f"clients of {b} image(s) aggregated in groups of {group}")

    def _check_client(self) -> None:
        """``client`` holds ClientSetup fields except those the audit sets (batch size, seed)."""
        known = [f.name for f in dataclasses.fields(ClientSetup)]
        for key in sorted_keys(self.client):
            if key == "batch_size":
                raise ConfigError("client: batch_size is set by the audit's batch_sizes, not here")
            if key == "seed":
                raise ConfigError("client: seed is set by the audit's top-level seed, not here")
            if key not in known:
                raise ConfigError(f"client: unknown key {show(key)}; keys: "
                                  f"{', '.join(k for k in known if k not in ('batch_size', 'seed'))}")
        self._client_setup("client", self.client)

    def _client_setup(self, where: str, values: Mapping[str, Any]) -> ClientSetup:
        try:
            return ClientSetup(**{**values, "batch_size": 1, "seed": self.seed})
        except ConfigError as error:
            raise ConfigError(f"{where}: {one_line(error, 300)}") from None

    def _check_utility(self) -> None:
        """The utility training's clients: the audit's client settings with its overrides."""
        u = self.utility
        if u is None:
            return
        if not isinstance(u, UtilityConfig):
            raise ConfigError(f"utility: expected a UtilityConfig or None, got {show(u)}")
        check_tree(u.model_options, "utility.model_options")
        overrides = {k: getattr(u, k) for k in ("protocol", "lr", "local_steps", "local_batch_size")
                     if getattr(u, k) is not None}
        self._client_setup("utility", {**self.client, **overrides})
        from ..models import parameter_shapes

        channels = 1 if u.data in ("faces", "digits") else 3
        with _named_errors("utility: model_options"):  # on the meta device: nothing is allocated
            parameter_shapes(u.model, (channels, u.size or 32, u.size or 32), 10, **u.model_options)

    def _check_attack_options(self) -> None:
        """Build every (model, attack) once, so that a bad model or attack option (or threat
        key) is refused now, naming it, rather than after hours of other cells."""
        from ..pipeline import make_attack

        threat = self._threat_model()
        size = self.data.get("size") or 32
        channels = 1 if self.data.get("name") in ("faces", "digits") else 3
        for k, model in enumerate(self.models):
            with _named_errors(f"models[{k}]"):
                spec = model.spec(seed=self.seed, dtype=self.dtype, device="cpu")
                if model.train is not None:  # the plan's weights do not exist yet: the architecture is checked
                    spec = spec.with_(weights=None)
                net = spec.build((channels, size, size), 10).module
            for j, attack in enumerate(self.attacks):
                if attack.applies_to(model):
                    with _named_errors(f"attacks[{j}]"):
                        make_attack(attack.name, net, threat, dict(attack.options))

    def _threat_model(self):
        """The ThreatModel of ``threat``, its keys and values checked."""
        from ..threat import ThreatModel

        known = [f.name for f in dataclasses.fields(ThreatModel)]
        unknown = [k for k in sorted_keys(self.threat) if k not in known]
        if unknown:
            raise ConfigError(f"threat: unknown key {show(unknown[0])}; keys: {', '.join(known)}")
        with _named_errors("threat"):
            return ThreatModel(**self.threat)

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
        """An audit from parsed YAML/TOML: its size and value types are checked first (:func:`check_tree`)."""
        check_tree(raw)
        _check_keys("the audit config", raw, cls)
        for key in ("models", "attacks"):
            if key not in raw:
                raise ConfigError(f"the audit config needs {key!r}")
        values: dict[str, Any] = {k: raw[k] for k in ("name", "seed", "dtype", "device") if k in raw}
        models = [_named(f"models[{k}]", m, ("weights", "mode", "train")) for k, m in enumerate(_list(raw, "models"))]
        values["models"] = tuple(ModelChoice(model_name(name, f"models[{k}]", _zoo()), options, **extra)
                                 for k, (name, options, extra) in enumerate(models))
        attacks = []
        for k, entry in enumerate(_list(raw, "attacks")):
            name, options, extra = _named(f"attacks[{k}]", entry, ("models",))
            models = extra.get("models")
            if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
                raise ConfigError(f"attacks[{k}].models: expected a list of model names, got {show(models)}")
            models = None if models is None else tuple(model_name(m, f"attacks[{k}].models", _zoo()) for m in models)
            attacks.append(AttackChoice(name, options, models))
        values["attacks"] = tuple(attacks)
        if "defenses" in raw:
            values["defenses"] = tuple(tuple(d if isinstance(d, list) else [d]) for d in _list(raw, "defenses"))
        if "batch_sizes" in raw:
            values["batch_sizes"] = tuple(_list(raw, "batch_sizes"))
        for key in ("data", "client", "threat"):
            if key in raw:
                if not isinstance(raw[key], Mapping):
                    raise ConfigError(f"{key}: expected a mapping, got {show(raw[key])}")
                values[key] = dict(raw[key])
        if "data" in values:
            values["data"] = {"name": "photos", "n": 4, "size": 32, **values["data"]}
        if "utility" in raw:
            off = raw["utility"] is False or raw["utility"] is None
            values["utility"] = None if off else _sub(UtilityConfig, "utility", raw["utility"])
        if "verdict" in raw:
            values["verdict"] = _sub(VerdictRule, "verdict", raw["verdict"])
        return cls(**values)


def _zoo():
    from ..models import MODELS

    return MODELS


def _sub(cls, key: str, value: Any):
    _check_keys(key, value, cls)
    return cls(**value)


def load_audit_config(path: str | Path, allow_imports: tuple[str, ...] = ()) -> AuditConfig:
    """An :class:`AuditConfig` from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file.

    The file is untrusted: at most 1 MiB, UTF-8, parsed safely, its size counted with YAML
    aliases expanded before any value is used; every problem is one ConfigError line. A
    model named ``package.module:factory`` is imported only if its module is in
    ``allow_imports`` (the CLI's ``--allow-import``); relative ``weights`` paths are read
    from the config's folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"audit config {str(path)!r}: expected a .yaml, .yml or .toml file")
    raw = parse_config(path, read_config(path))
    if raw is None or raw == {}:
        raise ConfigError(f"audit config {str(path)!r} is empty")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"audit config {str(path)!r}: expected a mapping of keys at the top, "
                          f"got a {type(raw).__name__}")
    check_tree(raw)
    if raw.get("modality") == "text":   # a text audit (gradleak.text.audit, docs/text.md)
        from ..text.audit import text_audit_from_mapping

        return text_audit_from_mapping(raw, path)
    check_imports(raw, tuple(allow_imports), f"audit config {str(path)!r}")
    return AuditConfig.from_mapping(resolve_weights(raw, path.parent))
