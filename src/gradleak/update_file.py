"""The update file format: one safetensors file with gradleak's JSON metadata and a digest.

Tensors are stored as ``update/<name>``, ``weights/<name>``, ``buffers/<name>`` and
``labels``; the metadata is JSON in the safetensors header with a SHA-256 digest over
metadata and tensor bytes. Files come from untrusted clients: :func:`load_update` never
unpickles anything, bounds the file and its header before parsing, refuses truncated,
tampered, mis-shaped, non-finite or pickle files with an
:class:`~gradleak.errors.UpdateFileError` naming the entry, and checks that a recorded zoo
model description builds exactly the update's parameters (on the ``meta`` device).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from ._containers import is_safetensors, safetensors_header
from ._io import atomic_write_bytes
from .data.spec import DataSpec
from .errors import ConfigError, UpdateFileError, one_line
from .update import FORMAT_NAME, FORMAT_VERSION, SharedUpdate

__all__ = ["save_update", "load_update", "DEFAULT_MAX_BYTES"]

_META_KEY = "gradleak"
_PREFIXES = ("update/", "weights/", "buffers/")
_LABELS = "labels"
DEFAULT_MAX_BYTES = 4 * 2**30


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
    """The safetensors header, bounded and checked entry by entry against the file
    (:func:`gradleak._containers.safetensors_header`) before safetensors reads anything."""
    if not is_safetensors(data):
        _sniff(path, data)
    # dtypes are refused by SharedUpdate, which names the entry as update['name'], buffers[...], labels
    return safetensors_header(data, lambda message: UpdateFileError(f"{path}: {message}"), dtypes=None)


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
