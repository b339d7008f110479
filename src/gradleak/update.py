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
pickle files with an :class:`~gradleak.errors.UpdateFileError` naming the entry.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from ._io import atomic_write_bytes
from .data.spec import DataSpec
from .errors import ConfigError, UpdateFileError, one_line
from .limits import MAX_BATCH, MAX_CLASSES, MAX_ITERATIONS, check_float, check_input_shape, check_int, short_repr
from .losses import LOSSES

__all__ = ["SharedUpdate", "save_update", "load_update", "UpdateKind", "FORMAT_VERSION"]

UpdateKind = Literal["gradient", "delta"]
FORMAT_NAME = "gradleak.update"
FORMAT_VERSION = 1
_META_KEY = "gradleak"
_PREFIXES = ("update/", "weights/", "buffers/")
_LABELS = "labels"
_MAX_HEADER = 64 * 2**20
DEFAULT_MAX_BYTES = 4 * 2**30
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


def _digest(metadata: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    sha = hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        sha.update(f"\0{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _flat_tensors(update: SharedUpdate) -> dict[str, torch.Tensor]:
    flat = {f"update/{n}": t for n, t in update.tensors.items()}
    for prefix, group in (("weights/", update.weights), ("buffers/", update.buffers)):
        flat.update({f"{prefix}{n}": t for n, t in (group or {}).items()})
    if update.labels is not None:
        flat[_LABELS] = update.labels.to(torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in flat.items()}


def save_update(update: SharedUpdate, path: str | Path) -> Path:
    """Write ``update`` to ``path`` (safetensors with JSON metadata), atomically."""
    tensors = _flat_tensors(update)
    metadata = update.metadata()
    header = {_META_KEY: json.dumps(metadata, allow_nan=False), "sha256": _digest(metadata, tensors)}
    return atomic_write_bytes(path, _safetensors_save(tensors, metadata=header))


def _sniff(path: Path, data: bytes) -> None:
    """Name the formats that hold pickles. Called only when the first 8 bytes are not a
    plausible safetensors header length followed by ``{``: a safetensors length is
    little-endian, so its low byte can be anything (0x80, ``(``, ``c``...), and sniffing
    before that check refused valid files whose header length is 128 mod 256."""
    if data[:4] == b"PK\x03\x04":
        raise UpdateFileError(f"refusing {path}: it is a zip archive (torch.save format), which holds pickles. "
                              "gradleak never unpickles update files; write them with gradleak.save_update (safetensors)")
    if data[:1] == b"\x80" or data[:2] in (b"(d", b"(l", b"}q", b"]q") or data[:1] == b"c":
        raise UpdateFileError(f"refusing {path}: it looks like a Python pickle. gradleak never unpickles update files "
                              "(they come from untrusted clients); write them with gradleak.save_update (safetensors)")


def _json(text: str | bytes, **kwargs) -> Any:
    """``json.loads`` whose every failure is a ValueError: deep nesting (RecursionError) and
    integers beyond Python's 4,300-digit conversion limit included."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (UnicodeDecodeError, TypeError) as error:
        raise ValueError(str(error)) from None


def _read_header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise UpdateFileError(f"{path}: {len(data)} bytes is too short to be a safetensors file (truncated?)")
    (length,) = struct.unpack("<Q", data[:8])
    if not (length <= _MAX_HEADER and data[8:9] == b"{"):
        _sniff(path, data)
    if length > _MAX_HEADER:
        raise UpdateFileError(f"{path}: header length {length} exceeds the {_MAX_HEADER}-byte limit (not a safetensors file?)")
    if 8 + length > len(data):
        raise UpdateFileError(f"{path}: truncated: the header claims {length} bytes but only {len(data) - 8} follow")
    try:
        header = _json(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise UpdateFileError(f"{path}: the safetensors header is not valid JSON ({one_line(error)})") from None
    if not isinstance(header, dict):
        raise UpdateFileError(f"{path}: the safetensors header is not a JSON object")
    return header


def _refuse_constant(token: str):
    """Strict JSON: the metadata was written with allow_nan=False, so NaN/Infinity means tampering."""
    raise ValueError(f"non-standard JSON constant {token!r}")


def _parse_metadata(path: Path, header: dict[str, Any]) -> tuple[dict[str, Any], str]:
    extra = header.get("__metadata__")
    if not isinstance(extra, dict) or _META_KEY not in extra:
        raise UpdateFileError(f"{path}: not a gradleak update file (the safetensors metadata has no {_META_KEY!r} entry)")
    try:
        metadata = _json(extra[_META_KEY], parse_constant=_refuse_constant)
    except ValueError as error:
        raise UpdateFileError(f"{path}: the {_META_KEY!r} metadata is not valid JSON ({one_line(error)})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise UpdateFileError(f"{path}: metadata 'format' must be {FORMAT_NAME!r}")
    if metadata.get("version") != FORMAT_VERSION:
        raise UpdateFileError(f"{path}: format version {metadata.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    digest = extra.get("sha256")
    if not isinstance(digest, str):
        raise UpdateFileError(f"{path}: the metadata has no 'sha256' digest")
    return metadata, digest


def _typed(path: Path, metadata: dict[str, Any], key: str, types: tuple[type, ...]) -> Any:
    value = metadata.get(key)
    if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise UpdateFileError(f"{path}: metadata {key!r} has type {type(value).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    return value


def _check_against_description(path: Path, update: SharedUpdate) -> None:
    """An update that names a zoo model must be one that model produces: the description
    builds exactly its parameters (checked on the meta device, nothing allocated, nothing
    imported), with the same input shape, the model's own loss, and labels in its range."""
    from .models import MODELS, check_description

    try:
        described = check_description(update.model, update.parameters)
    except ConfigError as error:
        raise UpdateFileError(f"{path}: {error}") from None
    if update.input_shape is not None and update.input_shape != described["input_shape"]:
        raise UpdateFileError(f"{path}: input_shape {update.input_shape} disagrees with the model description's "
                              f"{described['input_shape']}")
    if described["name"] not in MODELS:  # the user's factory: checked when the user builds it (check_recorded)
        return
    loss = MODELS[described["name"]].loss
    if update.loss != loss:
        raise UpdateFileError(f"{path}: the update says loss {update.loss!r}, but model {described['name']!r} trains "
                              f"with {loss!r}")
    classes = 2 if loss == "binary_cross_entropy" else described["num_classes"]
    if update.labels is not None and update.labels.numel() and int(update.labels.max()) >= classes:
        raise UpdateFileError(f"{path}: label {int(update.labels.max())} is out of range for {classes} classes")


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refusing what is not a regular file or is over ``max_bytes`` before reading."""
    try:
        if not path.is_file():  # also refuses FIFOs and devices, which could block or never end
            raise UpdateFileError(f"update file not found (or not a regular file): {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise UpdateFileError(f"{path}: {size} bytes exceeds max_bytes={max_bytes}")
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise UpdateFileError(f"cannot read update file {str(path)[:200]!r}: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise UpdateFileError(f"{path}: more than max_bytes={max_bytes} bytes")
    return data


def load_update(path: str | Path, model: torch.nn.Module | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> SharedUpdate:
    """Read and validate an update file written by :func:`save_update`.

    Refuses (with :class:`UpdateFileError`) missing, oversized, truncated, pickle/zip,
    malformed or tampered files (digest mismatch), unknown entries, non-floating or
    non-finite tensors, and, when ``model`` is given, names or shapes that do not match
    its parameters.
    """
    path = Path(path)
    data = _read_bounded(path, max_bytes)
    header = _read_header(path, data)
    metadata, digest = _parse_metadata(path, header)
    try:
        flat = _safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise UpdateFileError(f"{path}: malformed safetensors data ({error})") from None
    if _digest(metadata, flat) != digest:
        raise UpdateFileError(f"{path}: checksum mismatch: the file was modified after it was written (tampered or corrupted)")
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PREFIXES}
    labels = None
    for key, tensor in flat.items():
        if key == _LABELS:
            labels = tensor
            continue
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise UpdateFileError(f"{path}: unexpected entry {key!r} (entries are update/*, weights/*, buffers/* and labels)")
        groups[prefix][key[len(prefix):]] = tensor
    parameters = _typed(path, metadata, "parameters", (dict,)) or {}
    input_shape = _typed(path, metadata, "input_shape", (list,))
    try:
        spec = None if metadata.get("data_spec") is None else DataSpec.from_json(metadata["data_spec"])
        update = SharedUpdate(
            tensors=groups["update/"],
            kind=metadata.get("kind"),
            batch_size=_typed(path, metadata, "batch_size", (int,)),
            local_steps=_typed(path, metadata, "local_steps", (int,)) or 1,
            local_lr=_typed(path, metadata, "local_lr", (int, float)),
            local_epochs=_typed(path, metadata, "local_epochs", (int,)),
            local_batch_size=_typed(path, metadata, "local_batch_size", (int,)),
            loss=_typed(path, metadata, "loss", (str,)) or "cross_entropy",
            labels=labels,
            weights=groups["weights/"] or None,
            buffers=groups["buffers/"] or None,
            parameters=parameters,
            input_shape=None if input_shape is None else tuple(input_shape),
            data_spec=spec,
            model=_typed(path, metadata, "model", (dict,)),
            extra=_typed(path, metadata, "extra", (dict,)) or {},
            mode=_typed(path, metadata, "mode", (str,)),
        )
    except (UpdateFileError, ConfigError) as error:
        raise UpdateFileError(f"{path}: {error}") from None
    if update.model is not None:
        _check_against_description(path, update)
    if model is not None:
        try:
            update.validate_for(model)
        except UpdateFileError as error:
            raise UpdateFileError(f"{path}: {error}") from None
    return update
