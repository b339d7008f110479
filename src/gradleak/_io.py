"""Atomic file output: a result is either fully written or not there at all.

Every file gradleak writes goes through these helpers: the bytes are written to a
temporary file in the same folder, flushed to disk, and renamed over the target, so an
interrupted run never leaves a half-written update, figure or report behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "to_jsonable", "save_figure"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats to strict JSON values.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON has
    no such numbers, and browsers refuse ``Infinity``); :func:`from_json_float` reads them back.
    """
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def from_json_float(value: Any) -> float | None:
    """Inverse of :func:`to_jsonable` for one number (None stays None)."""
    if value is None:
        return None
    return float(value)  # float("inf") / float("nan") parse the string forms


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n")


def save_figure(figure, path: str | os.PathLike, **kwargs) -> Path:
    """Render a matplotlib figure to PNG bytes in memory, then write them atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **kwargs)
    return atomic_write_bytes(path, buffer.getvalue())
