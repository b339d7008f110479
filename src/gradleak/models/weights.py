"""Weights files: a model's state dict from disk, never by unpickling arbitrary objects.

Two formats are read:

- **safetensors** (what ``gradleak train`` writes): tensors only, by construction;
- **PyTorch state dicts** (``.pt``/``.pth``, e.g. torchvision's ``resnet18-f37072fd.pth``)
  through ``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which
  builds tensors, containers and numbers and refuses every other global. A pickle of
  arbitrary objects is refused in one line; its code never runs.

A checkpoint that wraps the state dict (``{"state_dict": ...}`` or ``{"model": ...}``) is
unwrapped, and a ``module.`` prefix on every key (``nn.DataParallel``) is removed.
:func:`apply_weights` then refuses, naming them, keys the model does not have, keys it has
that the file lacks, and tensors of another shape, before changing the model.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._containers import check_torch_zip, is_safetensors, safetensors_header
from ..errors import ConfigError, one_line

__all__ = ["MAX_WEIGHTS_BYTES", "WeightsFile", "read_weights", "apply_weights", "state_shapes", "weights_metadata"]

MAX_WEIGHTS_BYTES = 8 * 2**30   # a weights file: 8 GiB (ResNet-152 is 230 MB, ViT-H 2.5 GB)
# what a state dict's tensors may be: dense, of the dtypes parameters and buffers have
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                  torch.int64, torch.uint8, torch.bool)


@dataclass(frozen=True)
class WeightsFile:
    """A state dict read from ``path`` and the SHA-256 of the file's bytes (recorded in updates)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    sha256: str
    format: str   # "safetensors" | "pytorch"
    data_spec: Any = None   # the input normalization the weights were trained with (gradleak train records it)


def _unwrap(value: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(value, Mapping) and key in value and isinstance(value[key], Mapping):
            value = value[key]
            break
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"weights {str(path)!r}: not a state dict (a mapping from parameter name to tensor), "
                          f"got {type(value).__name__}")
    out = {}
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"weights {str(path)!r}: entry {str(name)[:80]!r} is a {type(tensor).__name__}, "
                              "not a tensor keyed by name")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.dtype not in ALLOWED_DTYPES:
            what = f"a {tensor.layout} tensor".replace("torch.", "") if tensor.layout != torch.strided else (
                "a quantized tensor" if tensor.is_quantized else f"of dtype {tensor.dtype}")
            raise ConfigError(f"weights {str(path)!r}: entry {name[:80]!r} is {what}; a state dict holds dense "
                              "float16/bfloat16/float32/float64 (or integer/bool buffer) tensors")
        out[name] = tensor
    if all(name.startswith("module.") for name in out):  # saved from nn.DataParallel
        out = {name[len("module."):]: tensor for name, tensor in out.items()}
    return out


def read_weights(path: str | Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> WeightsFile:
    """Read a safetensors or PyTorch state dict from ``path`` (bounded, regular files only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    from ..data._files import read_bounded
    from ..errors import DataError

    path = Path(path)
    try:
        data = read_bounded(path, "weights", max_bytes)
    except DataError as error:
        raise ConfigError(str(error)) from None
    digest = hashlib.sha256(data).hexdigest()

    def fail(message: str) -> ConfigError:
        return ConfigError(f"weights {str(path)!r}: {message}")

    if is_safetensors(data):
        header = safetensors_header(data, fail)  # bounded before safetensors allocates anything
        try:
            tensors = safetensors_load(data)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise fail(f"malformed safetensors data ({one_line(error, 200)})") from None
        return WeightsFile(path, _unwrap(tensors, path), digest, "safetensors", _recorded_spec(header, path))
    if data[:4] == b"PK\x03\x04":
        check_torch_zip(data, fail)  # bounded before PyTorch inflates anything
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing what it cannot read
            warnings.simplefilter("ignore")
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError, KeyError,
            OSError, RecursionError, UnicodeDecodeError, ImportError, IndexError) as error:
        first = one_line(str(error).split("\n\n")[0], 200)
        raise ConfigError(f"weights {str(path)!r}: not a safetensors file or a PyTorch state dict that loads with "
                          f"weights_only=True (nothing but tensors is ever unpickled): {first}") from None
    return WeightsFile(path, _unwrap(value, path), digest, "pytorch")


def weights_metadata(data_spec: Any = None) -> dict[str, str]:
    """The safetensors metadata ``gradleak train`` writes: one key (so the header's bytes are
    reproducible) holding what the weights were trained with, e.g. the input normalization."""
    import json

    return {"gradleak": json.dumps({"data_spec": None if data_spec is None else data_spec.to_json()},
                                   sort_keys=True)}


def _recorded_spec(header: dict[str, Any], path: Path):
    """The DataSpec a gradleak weights file records, or None (any other safetensors file)."""
    import json

    from ..data.spec import DataSpec

    try:
        recorded = json.loads((header.get("__metadata__") or {}).get("gradleak") or "null")
    except (ValueError, RecursionError, AttributeError, TypeError):
        return None  # safetensors already parsed the file; a foreign or odd header records nothing for us
    if not isinstance(recorded, dict) or recorded.get("data_spec") is None:
        return None
    try:
        return DataSpec.from_json(recorded["data_spec"])
    except ConfigError as error:
        raise ConfigError(f"weights {str(path)!r}: recorded data_spec: {error}") from None


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of what a weights file must hold: parameters and persistent buffers."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def apply_weights(model: nn.Module, weights: WeightsFile | Mapping[str, torch.Tensor], where: str = "weights") -> nn.Module:
    """Load ``weights`` into ``model`` in place (cast to each tensor's dtype, onto its device);
    refuse missing, unexpected or mis-shaped keys in one line before changing anything."""
    tensors = weights.tensors if isinstance(weights, WeightsFile) else dict(weights)
    if isinstance(weights, WeightsFile):
        where = f"weights {str(weights.path)!r}"
    expected = state_shapes(model)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    wrong = [(n, tuple(tensors[n].shape), s) for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != s]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        if wrong:
            name, got, want = wrong[0]
            parts.append(f"{name!r} has shape {got} but the model's is {want}"
                         + (f" (and {len(wrong) - 1} more shapes differ)" if len(wrong) > 1 else ""))
        raise ConfigError(f"{where} do not fit {type(model).__name__}: {'; '.join(parts)}")
    state = model.state_dict()
    cast = {}
    for name, tensor in tensors.items():
        target = state[name]
        if tensor.layout != torch.strided or tensor.dtype not in ALLOWED_DTYPES:
            raise ConfigError(f"{where}: {name!r} is a {tensor.layout} {tensor.dtype} tensor; weights are dense "
                              "float16/bfloat16/float32/float64 (or integer/bool buffers)")
        if target.is_floating_point() != tensor.is_floating_point() and tensor.dtype != torch.bool:
            raise ConfigError(f"{where}: {name!r} is {tensor.dtype} but the model's is {target.dtype}")
        cast[name] = tensor.to(dtype=target.dtype)  # checked after the cast: 1e300 is finite in float64 only
        if cast[name].is_floating_point() and not bool(torch.isfinite(cast[name]).all()):
            overflow = " after the cast to " + str(target.dtype) if bool(torch.isfinite(tensor).all()) else ""
            raise ConfigError(f"{where}: {name!r} holds NaN or infinite values{overflow}")
    with torch.no_grad():
        for name, tensor in cast.items():
            state[name].copy_(tensor.to(device=state[name].device))
    return model


def _names(names: list[str], shown: int = 3) -> str:
    text = ", ".join(repr(n[:80]) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
