"""What an audit keeps on disk for each audited update: the update itself, its ground truth
when the auditor has one, and every reconstruction with its update residual.

Beside ``round-XXX/node-<id>.safetensors`` (a gradleak update file, for ``gradleak attack``)
lie ``node-<id>.truth.safetensors`` (only with ``truth=``) and one
``node-<id>.reconstruction-<attack>.safetensors`` per attack that recovered images: entries
``images`` ([0, 1] scale, the attack's order) and ``labels`` (the attack's, else those its
residual solved from the classifier gradient; ``labels`` in the metadata says which), and in the
safetensors metadata (``gradleak``, JSON) the attack, its update residual (value,
certified, tolerance, labels' source) and the update file's name. The round's
secure-aggregation sum is ``sum.*``. Files are written atomically (:mod:`gradleak._io`);
:func:`load_reconstruction` reads one back, never unpickling, checking what it holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from .._io import atomic_write_bytes, to_jsonable
from ..errors import DataError
from .attacks import AttackOutcome

__all__ = ["update_path", "reconstruction_path", "save_reconstruction", "load_reconstruction"]

_META = "gradleak"
MAX_RECONSTRUCTION_BYTES = 2**30


def update_path(capture_dir: Path, server_round: int, node_id: int | None) -> Path:
    """``capture_dir/round-XXX/node-<id>.safetensors`` (``sum.safetensors`` for the round's sum)."""
    name = "sum" if node_id is None else f"node-{node_id}"
    return capture_dir / f"round-{server_round:03d}" / f"{name}.safetensors"


def reconstruction_path(update_file: Path, attack: str) -> Path:
    """``node-<id>.reconstruction-<attack>.safetensors`` beside the update file."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in attack)[:64]
    return update_file.with_name(f"{update_file.stem}.reconstruction-{safe}.safetensors")


def save_reconstruction(update_file: Path, outcome: AttackOutcome) -> Path | None:
    """Write ``outcome``'s reconstruction beside ``update_file``; None when it recovered no image."""
    rec = outcome.reconstruction
    if rec is None or rec.images is None:
        return None
    tensors = {"images": rec.images.detach().cpu().contiguous()}
    used = None if outcome.residual is None else outcome.residual.label_values
    if rec.labels is not None and rec.labels.numel() == rec.images.shape[0]:
        tensors["labels"], source = rec.labels.detach().cpu().to(torch.int64).contiguous(), "the attack's"
    elif used is not None and len(used) == rec.images.shape[0]:
        tensors["labels"], source = torch.tensor(used, dtype=torch.int64), outcome.residual.labels
    meta = {"attack": outcome.attack, "update": update_file.name, "labels": source if "labels" in tensors else None,
            "residual": None if outcome.residual is None else outcome.residual.to_json()}
    path = reconstruction_path(update_file, outcome.attack)
    atomic_write_bytes(path, safetensors_save(tensors, metadata={_META: json.dumps(to_jsonable(meta))}))
    return path


def load_reconstruction(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """``(images, labels or None, metadata)`` of a file written by :func:`save_reconstruction`;
    a DataError line names what is wrong with a file that is not one."""
    from ..data._files import read_safetensors

    path = Path(path)
    tensors = read_safetensors(path, "reconstruction file", MAX_RECONSTRUCTION_BYTES)
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or not images.is_floating_point() or images.ndim != 4:
        raise DataError(f"reconstruction file {path}: entry 'images' must be a float (N, C, H, W) tensor")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != (images.shape[0],)):
        raise DataError(f"reconstruction file {path}: entry 'labels' must be int64 with one label per image")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get(_META, "{}")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"reconstruction file {path}: its {_META!r} metadata is not JSON") from None
    return images, labels, meta if isinstance(meta, dict) else {}
