"""``SharedUpdate``: what one client sends to the server, and its file format.

An update holds named tensors (``dict[str, Tensor]`` keyed by the model's parameter
names, never positional lists) plus the metadata a server sees: the kind (a gradient,
FedSGD; or a weight delta ``w_local - w_global`` after local training, FedAvg), batch
size, local steps and learning rate, the loss, labels when the client shares them, and
the names and shapes of the parameters of the model it came from. The model's weights
at the round (what the server sent) may travel with it: they are part of what the
attacker has.

On disk an update is one safetensors file. Tensors are stored as ``update/<name>``,
``weights/<name>``, ``buffers/<name>`` and ``labels``; the metadata is JSON in the
safetensors header, with a SHA-256 digest over metadata and tensor bytes. Update files
come from untrusted clients: :func:`load_update` never unpickles anything, checks the
header before parsing, and refuses truncated, tampered, mis-shaped, non-finite or
pickle files with an :class:`~gradleak.errors.UpdateFileError` naming the entry. The
file format is implemented in :mod:`gradleak.update_file` (``save_update``, ``load_update``,
also importable from :mod:`gradleak`), which imports this module and never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import torch
from .data.spec import DataSpec
from .errors import ConfigError, UpdateFileError
from .limits import (MAX_BATCH, MAX_CLASSES, MAX_ITERATIONS, check_float, check_input_shape, check_int, check_nesting,
                     short_repr)
from .losses import LOSSES

__all__ = ["SharedUpdate", "UpdateKind", "FORMAT_VERSION"]

UpdateKind = Literal["gradient", "delta"]
FORMAT_NAME = "gradleak.update"
FORMAT_VERSION = 1
# dtypes an update file may hold: float tensors (gradients, weights), integer/bool buffers and labels.
# Anything else (float8, complex, unsigned wide ints) is refused before any arithmetic touches it.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OTHER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
_LABEL_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_MAX_DIM = 2**31


def _check_tensors(group: str, tensors: Mapping[str, torch.Tensor], *, floating: bool = True) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise UpdateFileError(f"{group}: expected a mapping from parameter name to tensor, got {type(tensors).__name__}")
    out = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise UpdateFileError(f"{group}: parameter names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise UpdateFileError(f"{group}[{name!r}]: expected a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES + (() if floating else _OTHER_DTYPES):
            kind = "a floating-point dtype (float16/bfloat16/float32/float64)" if floating else "a supported dtype"
            raise UpdateFileError(f"{group}[{name!r}]: dtype {tensor.dtype} is not {kind}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UpdateFileError(f"{group}[{name!r}]: {bad} of {tensor.numel()} values are NaN or infinite")
        out[name] = tensor
    return out


def _checked(check, *args, **kwargs):
    """A :mod:`gradleak.limits` check whose refusal is an UpdateFileError (the update is the bad input)."""
    try:
        return check(*args, **kwargs)
    except ConfigError as error:
        raise UpdateFileError(str(error)) from None


def _positive_int(name: str, value: Any, *, optional: bool = True, high: int = 2**31) -> int | None:
    return None if value is None and optional else _checked(check_int, name, value, 1, high)


@dataclass(frozen=True)
class SharedUpdate:
    """One client's shared update and the metadata the server sees with it.

    ``tensors``: gradients (``kind="gradient"``) or weight deltas ``w_local - w_global``
    (``kind="delta"``), keyed by parameter name. ``parameters``: names and shapes of the
    model the update came from (derived from ``tensors`` when not given). ``weights``:
    the model's parameters at the round. ``labels``: present only when the client shares
    them. ``data_spec``/``input_shape``: the client's normalization and input shape; the
    :class:`~gradleak.threat.ThreatModel` decides whether an attacker is granted them.
    """

    tensors: Mapping[str, torch.Tensor]
    kind: UpdateKind = "gradient"
    batch_size: int | None = None
    local_steps: int = 1
    local_lr: float | None = None
    local_epochs: int | None = None
    local_batch_size: int | None = None
    loss: str = "cross_entropy"
    labels: torch.Tensor | None = None
    weights: Mapping[str, torch.Tensor] | None = None
    buffers: Mapping[str, torch.Tensor] | None = None
    parameters: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    data_spec: DataSpec | None = None
    model: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    mode: str | None = None      # "train" | "eval": the mode the client ran its model in (BatchNorm, dropout)

    def __post_init__(self):
        tensors = _check_tensors("update", self.tensors)
        if not tensors:
            raise UpdateFileError("update: holds no tensors")
        if self.kind not in ("gradient", "delta"):
            raise UpdateFileError(f"kind must be 'gradient' or 'delta', got {self.kind!r}")
        _positive_int("batch_size", self.batch_size, high=MAX_BATCH)
        _positive_int("local_steps", self.local_steps, optional=False, high=MAX_ITERATIONS)
        _positive_int("local_epochs", self.local_epochs, high=MAX_ITERATIONS)
        _positive_int("local_batch_size", self.local_batch_size, high=MAX_BATCH)
        _checked(check_float, "local_lr", self.local_lr, low_open=True, optional=True)
        if self.kind == "gradient" and self.local_steps != 1:
            raise UpdateFileError(f"a gradient update has local_steps=1, got {self.local_steps}")
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise UpdateFileError(f"loss {short_repr(self.loss)} is not one of {sorted(LOSSES)}")
        parameters = _parameter_shapes(self.parameters) or {name: tuple(t.shape) for name, t in tensors.items()}
        for name, tensor in tensors.items():
            if name not in parameters:
                raise UpdateFileError(f"update[{name!r}]: not a parameter of the model it claims to come from")
            if tuple(tensor.shape) != parameters[name]:
                raise UpdateFileError(f"update[{name!r}]: shape {tuple(tensor.shape)} != parameter shape {parameters[name]}")
        missing = [name for name in parameters if name not in tensors]
        if missing:
            raise UpdateFileError(f"update: no tensor for parameter {missing[0]!r} ({len(missing)} of {len(parameters)} "
                                  "parameters missing); an update holds every parameter of its model")
        if self.weights is not None:
            weights = _check_tensors("weights", self.weights)
            for name, shape in parameters.items():
                if name not in weights:
                    raise UpdateFileError(f"weights: parameter {name!r} is missing")
                if tuple(weights[name].shape) != shape:
                    raise UpdateFileError(f"weights[{name!r}]: shape {tuple(weights[name].shape)} != parameter shape {shape}")
            extra_weights = sorted(set(weights) - set(parameters))
            if extra_weights:
                raise UpdateFileError(f"weights[{extra_weights[0]!r}]: not a parameter of the model")
        if self.buffers is not None:
            _check_tensors("buffers", self.buffers, floating=False)
        if self.labels is not None:
            labels = self.labels
            if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype not in _LABEL_DTYPES:
                raise UpdateFileError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels))} "
                                      f"of shape {tuple(getattr(labels, 'shape', ()))}")
            if labels.numel() and not bool(((labels >= 0) & (labels < MAX_CLASSES)).all()):
                raise UpdateFileError(f"labels must be class indices in 0..{MAX_CLASSES - 1}, got values from "
                                      f"{int(labels.min())} to {int(labels.max())}")
            if self.batch_size is not None and labels.numel() != self.batch_size:
                raise UpdateFileError(f"labels: {labels.numel()} labels for batch_size={self.batch_size}")
        if self.input_shape is not None:
            shape = _checked(check_input_shape, "input_shape", self.input_shape)
            object.__setattr__(self, "input_shape", shape)
        if self.mode not in (None, "train", "eval"):
            raise UpdateFileError(f"mode must be 'train', 'eval' or None, got {short_repr(self.mode)}")
        if self.data_spec is not None and not isinstance(self.data_spec, DataSpec):
            raise UpdateFileError(f"data_spec must be a DataSpec, got {type(self.data_spec).__name__}")
        for name in ("model", "extra"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise UpdateFileError(f"{name} must be a mapping, got {type(value).__name__}")
            if value is not None:
                _checked(check_nesting, name, dict(value))
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "parameters", parameters)

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "SharedUpdate":
        """A copy with floating tensors moved/cast (labels and buffers only moved)."""
        def move(group):
            if group is None:
                return None
            return {n: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for n, t in group.items()}

        labels = None if self.labels is None else self.labels.to(device=device)
        return replace(self, tensors=move(self.tensors), weights=move(self.weights), buffers=move(self.buffers), labels=labels)

    def as_gradient(self) -> dict[str, torch.Tensor]:
        """The gradient this update is, or equals exactly.

        A gradient is returned as is. A delta from a single local SGD step of known
        learning rate is ``-lr * gradient``, so ``-delta / lr`` is returned. Anything else
        (several local steps, unknown lr) is not a gradient and raises.
        """
        from .errors import AttackNotApplicable

        if self.kind == "gradient":
            return dict(self.tensors)
        if self.local_steps == 1 and self.local_lr is not None:
            return {n: -t / self.local_lr for n, t in self.tensors.items()}
        raise AttackNotApplicable(
            f"this delta comes from {self.local_steps} local steps (lr={self.local_lr}): it is not the gradient of one batch",
            condition="update is a gradient, or a single-step delta with known learning rate",
        )

    def validate_for(self, model: torch.nn.Module) -> "SharedUpdate":
        """Check that names and shapes match ``model``'s parameters; return self."""
        model_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for name, shape in self.parameters.items():
            if name not in model_shapes:
                raise UpdateFileError(f"entry {name!r} is not a parameter of the model ({type(model).__name__})")
            if shape != model_shapes[name]:
                raise UpdateFileError(f"entry {name!r}: shape {shape} but the model's parameter has shape {model_shapes[name]}")
        missing = [n for n in model_shapes if n not in self.parameters]
        if missing:
            raise UpdateFileError(f"the model's parameter {missing[0]!r} is missing from the update "
                                  f"({len(missing)} missing in all)")
        return self

    # --------------------------------------------------------------- metadata
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "batch_size": self.batch_size,
            "local_steps": self.local_steps,
            "local_lr": self.local_lr,
            "local_epochs": self.local_epochs,
            "local_batch_size": self.local_batch_size,
            "loss": self.loss,
            "parameters": {n: list(s) for n, s in self.parameters.items()},
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "data_spec": None if self.data_spec is None else self.data_spec.to_json(),
            "model": None if self.model is None else dict(self.model),
            "extra": dict(self.extra),
            "mode": self.mode,
        }


def _parameter_shapes(parameters: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` with every dimension a non-negative int below 2**31."""
    if not isinstance(parameters, Mapping):
        raise UpdateFileError(f"parameters must map names to shapes, got {type(parameters).__name__}")
    shapes = {}
    for name, shape in parameters.items():
        if not isinstance(name, str) or not name:
            raise UpdateFileError(f"parameters: names must be non-empty strings, got {short_repr(name)}")
        if not isinstance(shape, (list, tuple)) or len(shape) > 8 or any(
                isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < _MAX_DIM for d in shape):
            raise UpdateFileError(f"parameters[{name!r}]: a shape is up to 8 integers in 0..{_MAX_DIM - 1}, "
                                  f"got {short_repr(shape)}")
        shapes[name] = tuple(shape)
    return shapes
