"""Checking a run folder someone hands to ``gradleak report`` or ``gradleak compare``: every
file and entry the pictures and pages use, bounded, one :class:`~gradleak.errors.DataError`
line naming the file and the entry (see :mod:`gradleak.runs`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch

from .data._files import quote
from .errors import DataError

MAX_RUN_JSON_BYTES = 64 * 2**20
MAX_RUN_TENSOR_BYTES = 2**30
MAX_RUN_IMAGES = 100_000
MAX_RUN_IMAGE_ELEMENTS = 2**28  # values in one images/originals tensor (1 GiB in float32)
MAX_HISTORY_PANELS = 100
_IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _json_kind(value: Any) -> str:
    for kinds, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"),
                        (dict, "an object"), (type(None), "null")):
        if isinstance(value, kinds):
            return name
    return type(value).__name__


def _entry(name: Any) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...") if isinstance(name, str) else repr(name)


def _bad(path: Path, entry: str, condition: str) -> DataError:
    return DataError(f"run file {quote(path)}: entry {entry} {condition}")


def _number_like(value: Any) -> bool:
    """A JSON number, null, or the strings to_jsonable writes for non-finite floats."""
    if isinstance(value, bool):
        return False
    return value is None or isinstance(value, (int, float)) or value in ("inf", "-inf", "nan")


def _check_values(path: Path, entry: str, values: Any) -> int:
    if not isinstance(values, list):
        raise _bad(path, entry, f"must be a list of numbers, got {_json_kind(values)}")
    for k, value in enumerate(values):
        if not _number_like(value):
            raise _bad(path, f"{entry}[{k}]", f'must be a number (or null, "inf", "nan"), got {_json_kind(value)}')
    return len(values)


def _check_history(path: Path, history: Any) -> dict[str, Any]:
    if not isinstance(history, dict):
        raise DataError(f"run file {quote(path)}: must hold a JSON object (curve name -> values), got "
                        f"{_json_kind(history)}")
    if len({name.split("[", 1)[0] for name in history}) > MAX_HISTORY_PANELS:
        raise DataError(f"run file {quote(path)}: more than {MAX_HISTORY_PANELS} curve panels (MAX_HISTORY_PANELS)")
    for name, series in history.items():
        if isinstance(series, dict):
            if "y" not in series:
                raise _bad(path, _entry(name), 'is an object without a "y" list')
            count = _check_values(path, _entry(name) + ".y", series["y"])
            if series.get("x") is not None and _check_values(path, _entry(name) + ".x", series["x"]) != count:
                raise _bad(path, _entry(name), f"has {len(series['x'])} x values but {count} y values")
        else:
            _check_values(path, _entry(name), series)
    return history


def _check_metrics(path: Path, metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        raise DataError(f"run file {quote(path)}: must hold a JSON object, got {_json_kind(metrics)}")
    for key in ("summary", "lpips"):
        if key in metrics and not isinstance(metrics[key], dict):
            raise _bad(path, repr(key), f"must be an object, got {_json_kind(metrics[key])}")
    if "attack" in metrics and not isinstance(metrics["attack"], (str, type(None))):
        raise _bad(path, "'attack'", f"must be a string, got {_json_kind(metrics['attack'])}")
    notes = metrics.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(note, (str, dict)) for note in notes):
        raise _bad(path, "'notes'", "must be a list of strings")
    rows = metrics.get("per_image", [])
    if not isinstance(rows, list):
        raise _bad(path, "'per_image'", f"must be a list of objects, got {_json_kind(rows)}")
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _bad(path, f"'per_image'[{k}]", f"must be an object, got {_json_kind(row)}")
        if "psnr" not in row:
            raise _bad(path, f"'per_image'[{k}]", "has no 'psnr'")
        recovered = row.get("recovered", True)
        if not isinstance(recovered, bool):
            raise _bad(path, f"'per_image'[{k}].recovered", f"must be true or false, got {_json_kind(recovered)}")
        for key in ("index", "matched_to"):
            value = row.get(key)
            if key == "matched_to" and value is None and not recovered:
                continue  # an original no reconstruction matched
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(path, f"'per_image'[{k}].{key}", f"must be a non-negative integer, got {_json_kind(value)}")
        for key in ("psnr", "ssim", "mse", "lpips"):
            if not _number_like(row.get(key)):
                raise _bad(path, f"'per_image'[{k}].{key}", f"must be a number or null, got {_json_kind(row[key])}")
    return metrics


def _check_image_tensor(path: Path, name: str, tensor: torch.Tensor, *, unit_range: bool) -> None:
    if tensor.dtype not in _IMAGE_DTYPES:
        raise _bad(path, repr(name), f"must be a floating-point tensor (float16/32/64, bfloat16), got {tensor.dtype}")
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise _bad(path, repr(name), f"must have shape (N, 1 or 3, H, W), got {tuple(tensor.shape)}")
    if tensor.shape[0] > MAX_RUN_IMAGES or tensor.numel() > MAX_RUN_IMAGE_ELEMENTS:
        raise _bad(path, repr(name), f"of shape {tuple(tensor.shape)} exceeds the limits of {MAX_RUN_IMAGES} images "
                   f"and {MAX_RUN_IMAGE_ELEMENTS} values")
    if unit_range and not bool(torch.isfinite(tensor).all()):  # a diverged reconstruction may hold NaN; truth not
        raise _bad(path, repr(name), "holds NaN or infinite values")
    if unit_range and tensor.numel() and (float(tensor.min()) < 0.0 or float(tensor.max()) > 1.0):
        raise _bad(path, repr(name), f"must lie in [0, 1], found [{float(tensor.min()):.4g}, {float(tensor.max()):.4g}]")


def _check_label_tensor(path: Path, name: str, tensor: torch.Tensor, count: int | None, of: str) -> None:
    if tensor.dtype not in _LABEL_DTYPES or tensor.ndim != 1:
        raise _bad(path, repr(name), f"must be a 1-d integer tensor, got {tensor.dtype} {tuple(tensor.shape)}")
    if count is not None and tensor.shape[0] != count:
        raise _bad(path, repr(name), f"has {tensor.shape[0]} labels but {of!r} has {count} images")
    if tensor.numel() and int(tensor.min()) < 0:
        raise _bad(path, repr(name), f"holds a negative label ({int(tensor.min())})")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    images, originals = tensors.get("images"), tensors.get("originals")
    for name, tensor in (("images", images), ("originals", originals)):
        if tensor is not None:
            _check_image_tensor(path, name, tensor, unit_range=name == "originals")
    if images is not None and originals is not None and images.shape[1:] != originals.shape[1:]:
        raise _bad(path, "'originals'", f"of shape {tuple(originals.shape)} does not match 'images' of shape "
                   f"{tuple(images.shape)} (C, H, W must agree)")
    for name, of in (("labels", "images"), ("true_labels", "originals")):
        if tensors.get(name) is not None:
            count = None if tensors.get(of) is None else int(tensors[of].shape[0])
            _check_label_tensor(path, name, tensors[name], count, of)
    for name, tensor in tensors.items():
        if name.startswith("features/") and (len(name) == 9 or tensor.dtype not in _IMAGE_DTYPES or tensor.ndim < 1):
            raise _bad(path, repr(name), f"must be a named floating-point tensor, got {tensor.dtype} {tuple(tensor.shape)}")


def _check_matching(path: Path, metrics: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """per_image rows index originals ('index') and reconstructions ('matched_to') that exist;
    without rows, originals and reconstructions are shown in pairs and must be as many."""
    images, originals = tensors.get("images"), tensors.get("originals")
    if not metrics.get("per_image") and images is not None and originals is not None \
            and images.shape[0] != originals.shape[0]:
        raise DataError(f"run file {quote(path.parent / 'reconstruction.safetensors')}: {originals.shape[0]} "
                        f"'originals' but {images.shape[0]} 'images', and {path.name} matches none of them")
    for key, name in (("index", "originals"), ("matched_to", "images")):
        if tensors.get(name) is None:
            continue
        count = int(tensors[name].shape[0])
        for k, row in enumerate(metrics.get("per_image", [])):
            if row[key] is not None and row[key] >= count:
                raise _bad(path, f"'per_image'[{k}].{key}", f"is {row[key]} but reconstruction.safetensors holds "
                           f"{count} {name}")


def _run_folder(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    try:
        mode = os.stat(run_dir).st_mode
    except OSError as error:
        why = "it does not exist" if isinstance(error, FileNotFoundError) else f"cannot access it ({error.strerror})"
        raise DataError(f"{quote(run_dir)} is not a gradleak run folder: {why}") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"{quote(run_dir)} is not a gradleak run folder: it is a file, not a folder")
    needed = ["reconstruction.safetensors", "metrics.json", "history.json"]
    missing = [name for name in needed if not os.path.lexists(run_dir / name)]
    if missing:
        raise DataError(f"{quote(run_dir)} is not a gradleak run folder: {', '.join(missing)} missing")
    return run_dir
