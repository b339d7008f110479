"""The audit's models: ``ModelChoice`` (a zoo name or a factory, its options, weights, mode
and an optional training plan) and the rules for naming code in a config file.

A config file may come from someone else: a ``package.module:factory`` it names is imported
only when the user allows that module on the command line (``--allow-import MODULE``, or
``load_audit_config(path, allow_imports=...)``). Weights files are data (safetensors, or
PyTorch state dicts read with ``weights_only=True``) and are read relative to the config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ._checks import show

__all__ = ["ModelChoice", "check_imports", "resolve_weights"]


@dataclass(frozen=True)
class ModelChoice:
    """One model of the audit. ``weights``: a weights file the clients start from (e.g. a
    trained network); ``mode``: ``train`` (BatchNorm with the batch's statistics, as training
    clients run) or ``eval``; ``train``: a training plan (see ``gradleak.training.TrainPlan``)
    run once before the cells, whose weights the clients then start from."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    mode: str = "train"
    train: Mapping[str, Any] | None = None

    @property
    def label(self) -> str:
        text = self.name + ("(" + ",".join(f"{k}={v}" for k, v in self.options.items()) + ")" if self.options else "")
        if self.weights is not None:
            text += f" @{Path(self.weights).name}"
        if self.train is not None:
            text += " trained"
        return text + (" [eval]" if self.mode == "eval" else "")

    def spec(self, *, seed: int, dtype: str, device: str, weights: str | Path | None = None):
        """The :class:`~gradleak.models.ModelSpec` this choice builds (``weights`` overrides,
        e.g. the weights a ``train`` plan produced)."""
        from ..models import ModelSpec

        return ModelSpec(self.name, self.options, weights=weights or self.weights, device=device, mode=self.mode,
                         dtype=dtype, seed=seed)

    def key(self) -> dict[str, Any]:
        """What identifies the model in a cell's key: name and options, and (only when set, so
        audits stored before these existed keep their cells) the weights' digest, mode, plan."""
        key: dict[str, Any] = {"name": self.name, "options": self.options}
        if self.weights is not None:
            key["weights_sha256"] = _file_digest(self.weights)
        if self.mode != "train":
            key["mode"] = self.mode
        if self.train is not None:
            key["train"] = dict(self.train)
        return key

    def check(self, where: str) -> None:
        from ..models import MODELS, MODES
        from ..names import model_name

        if model_name(self.name, where, MODELS) != self.name:  # the parser stores names normalised
            raise ConfigError(f"{where}: model name {show(self.name)} is not normalised")
        if self.mode not in MODES:
            raise ConfigError(f"{where}.mode: must be train or eval, got {show(self.mode)}")
        if self.weights is not None:
            if not isinstance(self.weights, (str, Path)) or not _is_file(self.weights):
                raise ConfigError(f"{where}.weights: {show(self.weights)} is not a file")
        if self.train is not None:
            if not isinstance(self.train, Mapping):
                raise ConfigError(f"{where}.train: expected a mapping of training settings, got {show(self.train)}")
            if self.weights is not None:
                raise ConfigError(f"{where}: give weights or train, not both")

    def training(self, data: Mapping[str, Any], seed: int):
        """(TrainPlan, DataRequest) of ``train``: TrainPlan fields, plus ``data`` ({name, n, size};
        by default every image of the audit's data set at its size, so the attacked images are
        among the training images, as a client's data is in federated learning)."""
        from ..data.request import DataRequest
        from ..training import TrainPlan

        values = dict(self.train or {})
        request = values.pop("data", None) or {}
        if not isinstance(request, Mapping):
            raise ConfigError(f"train.data: expected {{name, n, size}}, got {show(request)}")
        request = {"name": data["name"], "n": None, "size": data.get("size"), **request}
        try:
            return TrainPlan(**{"seed": seed, **values}), DataRequest(**request)
        except TypeError as error:
            raise ConfigError(f"train: {error}") from None


def _is_file(path: str | Path) -> bool:
    """A regular file there (False for a name the file system refuses: too long, a NUL byte)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _file_digest(path: str | Path) -> str:
    from ..models.weights import read_weights

    return read_weights(path).sha256 if _is_file(path) else hashlib.sha256(str(path).encode()).hexdigest()


def check_imports(raw: Mapping[str, Any], allow_imports: tuple[str, ...], where: str) -> None:
    """Refuse a ``package.module:factory`` in a config file unless its module is allowed; the
    name is normalised first (:mod:`gradleak.names`), as it will be when it is built."""
    from ..names import check_import_allowed

    models = raw.get("models") or []
    utility = raw.get("utility")
    for k, entry in enumerate(models if isinstance(models, list) else []):
        name = entry.get("name") if isinstance(entry, Mapping) else entry
        check_import_allowed(name, allow_imports, f"{where}: models[{k}]")
    if isinstance(utility, Mapping):
        check_import_allowed(utility.get("model"), allow_imports, f"{where}: utility.model")


def resolve_weights(raw: Mapping[str, Any], folder: Path) -> Mapping[str, Any]:
    """The config with every model's relative ``weights`` path made relative to ``folder``."""
    models = raw.get("models")
    if not isinstance(models, list):
        return raw
    resolved = []
    for entry in models:
        if isinstance(entry, Mapping) and isinstance(entry.get("weights"), str):
            path = Path(entry["weights"]).expanduser()
            entry = {**entry, "weights": str(path if path.is_absolute() else folder / path)}
        resolved.append(entry)
    return {**raw, "models": resolved}
