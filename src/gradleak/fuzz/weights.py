"""Hostile weights files: what ``--weights`` and an audit model's ``weights:`` must survive.

A weights file may come from anyone (a model zoo, a colleague, an attacker who wants the
server to load it). :func:`~gradleak.models.weights.read_weights` followed by
:func:`~gradleak.models.weights.apply_weights` must, for every file, load weights that leave
the model finite and dense, or refuse in one line, in bounded time and memory, without running
a pickle. The inputs start from real state dicts (MLP, LeNet, ConvNet) saved as safetensors
and as ``torch.save`` zips, and are mutated:

- ``flip`` / ``truncate``: bytes changed, the file cut;
- ``header``: the safetensors JSON edited (dtypes, shapes, offsets, counts);
- ``tensors``: the state dict edited and saved again (float8, complex, sparse COO/CSR, quantized,
  NaN, 1e300 in float64, shapes, missing/extra/renamed keys, wrappers, non-tensor values,
  thousands of tiny tensors) in either format;
- ``zip``: the archive edited (DEFLATE-compressed entries, a zip bomb, sizes that lie, a
  pickle payload in ``data.pkl``, many entries);
- ``legacy``: the pre-1.6 ``torch.save`` format with storages that claim more than the file;
- ``foreign`` / ``special``: as for update files.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import random
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as safetensors_save

from ._engine import Campaign, run_inputs
from .updates import _header_edit, common_mutation

__all__ = ["KINDS", "seed_states", "hostile_weights", "run_weights"]

KINDS = ("flip", "truncate", "header", "tensors", "zip", "legacy", "foreign", "special")
MARKER = "gradleak-fuzz-pickle-ran"
_MODELS = (("mlp", {"hidden": "16"}), ("lenet", {}), ("convnet", {"width": 2}))


def seed_states() -> list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """(model, its state dict) of small zoo models: what the mutations start from."""
    from ..models import build_model

    out = []
    for name, options in _MODELS:
        model = build_model(name, (3, 16, 16), 10, **options)
        out.append((model, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}))
    return out


def _torch_bytes(value: Any, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def _edit_tensor(rng: random.Random, tensor: torch.Tensor) -> torch.Tensor:
    choice = rng.randrange(9)
    if choice == 0:
        return tensor.to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16,
                                     torch.int32, torch.bool, torch.float16, torch.bfloat16, torch.float64]))
    if choice == 1 and tensor.is_floating_point() and tensor.numel():
        flat = tensor.clone().reshape(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        return flat.reshape(tensor.shape)
    if choice == 2 and tensor.is_floating_point():
        return tensor.double() * 0 + rng.choice([1e300, -1e300, 1e39, 3.5e38])
    if choice == 3:
        return tensor.reshape(-1)
    if choice == 4:
        return torch.cat([tensor.reshape(-1), tensor.reshape(-1)])
    if choice == 5 and tensor.dim() == 2:
        with warnings.catch_warnings():  # CSR support is "beta"; hostile files hold it anyway
            warnings.simplefilter("ignore")
            return tensor.to_sparse() if rng.random() < 0.5 else tensor.to_sparse_csr()
    if choice == 6 and tensor.is_floating_point():
        with warnings.catch_warnings():  # quantized tensors are deprecated; hostile files still hold them
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(tensor.float(), 0.1, 0, torch.qint8)
    if choice == 7:
        return torch.zeros(0)
    return tensor


def _edit_state(rng: random.Random, state: dict[str, torch.Tensor]) -> Any:
    state = dict(state)
    key = rng.choice(list(state))
    choice = rng.randrange(10)
    if choice < 3:
        state[key] = _edit_tensor(rng, state[key])
    elif choice == 3:
        del state[key]
    elif choice == 4:
        state[rng.choice(["ghost", key + ".extra", "", "a" * 300])] = torch.zeros(3)
    elif choice == 5:
        state = {f"module.{k}": v for k, v in state.items()} if rng.random() < 0.5 else \
            {rng.choice(["state_dict", "model", "model_state_dict", "weights"]): state}
    elif choice == 6:
        state[key] = rng.choice([3, "x", [1.0, 2.0], None, {"a": torch.zeros(1)}])
    elif choice == 7:
        state = _MANY if rng.random() < 0.2 else {f"t{k}": torch.zeros(1) for k in range(1000)}
    elif choice == 8:
        return rng.choice([[], {}, 3, "state", [state[key]], {1: state[key]}])
    return state


def _state_file(rng: random.Random, state: Any) -> bytes:
    """The edited state in one of the two formats (safetensors when it can hold it)."""
    if state is _MANY:
        return _saved_many(rng.random() < 0.5)
    storable = isinstance(state, dict) and state and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized
        and v.dtype != torch.complex64 for k, v in state.items())
    if storable and rng.random() < 0.5:
        try:
            return _safetensors_bytes(state)
        except Exception:  # noqa: BLE001 - e.g. safetensors refusing a dtype: use the other format
            pass
    return _torch_bytes(state)


def _zip_edit(rng: random.Random, data: bytes, path: Path) -> bytes:
    archive = zipfile.ZipFile(io.BytesIO(data))
    entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    choice = rng.randrange(5)
    out = io.BytesIO()
    if choice == 0:  # a zip bomb: a storage of zeros, compressed
        entries = [(name, b"\0" * 2**20 if "/data/" in name else body) for name, body in entries]
    with zipfile.ZipFile(out, "w") as archive_out:
        for name, body in entries:
            if choice == 2 and name.endswith("data.pkl"):
                class Payload:
                    def __reduce__(self):
                        return (os.system, (f"touch {path.parent / MARKER}",))

                body = pickle.dumps(Payload(), protocol=2)
            compress = zipfile.ZIP_DEFLATED if choice in (0, 1) else zipfile.ZIP_STORED
            archive_out.writestr(name, body, compress_type=compress)
        if choice == 3:
            for k in range(10):
                archive_out.writestr(f"archive/extra/{k}", b"")
    data = out.getvalue()
    if choice == 3 and rng.random() < 0.1:
        return _many_entries()
    if choice == 4:  # the central directory claims another size for an entry
        mutated = bytearray(data)
        at = mutated.find(b"PK\x01\x02")
        if at >= 0:
            mutated[at + 24 : at + 28] = struct.pack("<I", rng.choice([0, 1, 2**31, 2**32 - 1]))
        data = bytes(mutated)
    return data


_MANY = {f"t{k}": torch.zeros(1) for k in range(20_000)}  # 20,000 tiny tensors: slow to save, saved once


@functools.lru_cache(maxsize=1)
def _many_entries() -> bytes:
    """An archive of 100,100 empty entries (over the limit): slow to write, written once."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
        for k in range(100_100):
            archive.writestr(f"archive/data/{k}", b"")
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def _saved_many(safetensors: bool) -> bytes:
    return _safetensors_bytes(_MANY) if safetensors else _torch_bytes(_MANY)


def _legacy(rng: random.Random, state: dict[str, torch.Tensor]) -> bytes:
    """The pre-1.6 format; mostly with one storage's element count (the int before ``None,
    TUPLE`` in its persistent id) made larger than the file can hold."""
    data = bytearray(_torch_bytes(state, legacy=True))
    if rng.random() < 0.8:
        widths = {ord("K"): 1, ord("M"): 2, ord("J"): 4}
        sites = [at for at in range(6, len(data) - 1) if data[at : at + 2] == b"Nt"
                 and any(data[at - 1 - w] == op for op, w in widths.items())]
        if sites:
            at = rng.choice(sites)
            op, width = next((op, w) for op, w in widths.items() if data[at - 1 - w] == op)
            huge = rng.choice([2**31 - 1, 2**30, 10**6, 0])
            data[at - 1 - width : at] = b"J" + struct.pack("<i", huge)
    return bytes(data)


def hostile_weights(folder: Path, n: int, seed: int = 0,
                    states: list[tuple[torch.nn.Module, dict]] | None = None) -> list[tuple[str, tuple[Path, int]]]:
    """Write ``n`` hostile weights files into ``folder``: ``[(kind, (path, seed index))]``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    states = states or seed_states()
    originals = [(_safetensors_bytes(s), _torch_bytes(s)) for _, s in states]
    inputs = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        k = rng.randrange(len(states))
        state = states[k][1]
        data = originals[k][rng.randrange(2)]
        path = folder / f"weights-{index:06d}{rng.choice(['.safetensors', '.pt', '.pth', ''])}"
        handled, out, path = common_mutation(rng, kind, data, path)
        if handled:
            pass
        elif kind == "header":
            out = _header_edit(rng, originals[k][0])
        elif kind == "tensors":
            out = _state_file(rng, _edit_state(rng, state))
        elif kind == "zip":
            out = _zip_edit(rng, originals[k][1], path)
        else:
            out = _legacy(rng, state)
        if out is not None:
            path.write_bytes(out)
        inputs.append((kind, (path, k)))
    return inputs


def run_weights(folder: Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Campaign:
    """Generate ``n`` hostile weights files; read each and apply it to its model."""
    from ..models.weights import apply_weights, read_weights

    states = seed_states()

    def load(item: tuple[Path, int]) -> torch.nn.Module:
        path, k = item
        return apply_weights(states[k][0], read_weights(path))

    def check(model: torch.nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            if tensor.is_meta or tensor.layout != torch.strided:
                raise ValueError(f"{name!r} is not a dense tensor")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name!r} is not finite")

    campaign = run_inputs("weights", hostile_weights(folder, n, seed, states), load, check,
                          describe=lambda item: str(item[0]), progress=progress)
    if (folder / MARKER).exists():
        campaign.side_effects.append("a pickle payload ran")
    return campaign


run = run_weights  # the surface's entry point for gradleak.fuzz.run_surface
