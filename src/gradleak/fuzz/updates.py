"""Hostile update files, generated: the fuzzer behind gradleak's promise about untrusted input.

An update file comes from a client the server does not trust. :func:`load_update` must, for
every byte string, either return a fully valid :class:`~gradleak.update.SharedUpdate` or
raise a :class:`~gradleak.errors.GradleakError` with a one-line message, in bounded time and
memory, and never unpickle anything. This module produces inputs to check that: it starts
from real update files (FedSGD gradients with labels, FedAvg deltas, BatchNorm buffers) and
mutates them the way an attacker or a broken client would:

- ``flip``: a few bytes changed anywhere (header, metadata, tensor bytes);
- ``truncate``: the file cut at a random point;
- ``length``: the 8-byte header length rewritten (0, off by a little, beyond the file, huge);
- ``header``: the safetensors JSON edited (dtypes, shapes, offsets, entries) and re-framed;
- ``metadata``: gradleak's metadata edited with hostile values *and re-signed* with a valid
  digest, so that the semantic checks are what must refuse it;
- ``payload``: tensors changed (dtypes such as float8/complex/uint16, NaN, shapes, entries
  dropped or added) and re-signed;
- ``foreign``: pickles of every protocol (including one whose unpickling would create a
  marker file), torch.save zips, JSON, text, random bytes, an empty file;
- ``special``: a folder, a FIFO, a symlink to /dev/zero, a symlink loop, a missing path and an
  over-long name.

``python -m gradleak.fuzz --surface updates --n 10000`` runs a long campaign and prints the counts.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_save

from ..update import SharedUpdate
from ..update_file import _digest, _flat_tensors, load_update, save_update
from ._engine import Campaign, run_inputs

__all__ = ["seed_updates", "hostile_inputs", "run_campaign", "Campaign", "KINDS"]

KINDS = ("flip", "truncate", "length", "header", "metadata", "payload", "foreign", "special")
MARKER = "gradleak-fuzz-pickle-ran"


def seed_updates() -> list[SharedUpdate]:
    """Real updates of small zoo models on built-in photos: the files the mutations start from."""
    from ..client import fedavg_update, fedsgd_update
    from ..data import load_builtin
    from ..data.spec import DataSpec
    from ..models import build_model, model_info

    photos = load_builtin("photos", size=16, n=4)
    images, labels = photos.images, photos.labels
    spec = DataSpec.from_images(images)
    updates = []
    for name, options in (("mlp", {"hidden": "16"}), ("lenet", {}), ("convnet", {"width": 2})):
        model = build_model(name, (3, 16, 16), 10, **options)
        info = model_info(name, (3, 16, 16), 10, 0, **options)
        updates.append(fedsgd_update(model, images[:2], labels[:2], share_labels=True, spec=spec, model_info=info))
        updates.append(fedavg_update(model, images, labels, lr=0.05, epochs=1, local_batch_size=2, spec=spec,
                                     model_info=info))
    return updates


def _frame(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _signed(tensors: dict[str, torch.Tensor], metadata_text: str) -> bytes:
    """A file whose digest is valid for this (possibly hostile) metadata and these tensors."""
    try:
        digest = _digest(json.loads(metadata_text), tensors)
    except (ValueError, RecursionError):
        digest = "0" * 64  # metadata that does not parse: any digest will do
    return safetensors_save(tensors, metadata={"gradleak": metadata_text, "sha256": digest})


_HOSTILE_VALUES: tuple = (
    -1, 0, 1, 2**31, 2**63, 10**30, 10**400, -(10**400), 1e308, -0.0, 0.5, "", "a", "x" * 5000, [], [[]], {}, None,
    True, False, ["a"], [0], [-1, 2], [3, 50000, 50000], [3, 32, 32, 1, 1], {"mean": [1e999], "std": [1]},
    {"mean": ["a"], "std": [1]}, {"mean": [0], "std": [0]}, {"mean": [10**400], "std": [1]},
    {"name": "mlp", "input_shape": [3, 32, 32], "num_classes": 10, "kwargs": {"hidden": "200000,200000"}},
    {"name": "os:system", "input_shape": [3, 8, 8], "num_classes": 10},
    {"name": "mlp", "input_shape": [3, 8, 8], "num_classes": 10, "seed": 10**30},
    "binary_cross_entropy", "mse", "delta", "gradient",
)
_RAW_VALUES = ("1" + "0" * 5000, "[" * 3000 + "]" * 3000, "1e999", "-1e999", "NaN", "Infinity", '"\\ud800"')


def _metadata_edit(rng: random.Random, update: SharedUpdate) -> bytes:
    metadata = update.metadata()
    tensors = _flat_tensors(update)
    key = rng.choice([*metadata, "unknown", "parameters/entry"])
    if key == "parameters/entry" and metadata["parameters"]:
        name = rng.choice(list(metadata["parameters"]))
        choice = rng.random()
        if choice < 0.4:
            del metadata["parameters"][name]
        elif choice < 0.8:
            metadata["parameters"][name] = rng.choice(_HOSTILE_VALUES)
        else:
            metadata["parameters"][f"{name}.extra"] = [1]
    elif rng.random() < 0.25:  # raw JSON text that json.dumps would never write
        text = json.dumps(metadata)
        return _signed(tensors, text.replace(f'"{key}": ', f'"{key}": {rng.choice(_RAW_VALUES)}, "_": ', 1))
    else:
        metadata[key] = rng.choice(_HOSTILE_VALUES)
    try:
        text = json.dumps(metadata)
    except ValueError:  # e.g. an integer beyond the conversion limit inside json.dumps
        text = json.dumps({**metadata, key: None})
    return _signed(tensors, text)


def _payload_edit(rng: random.Random, update: SharedUpdate) -> bytes:
    tensors = _flat_tensors(update)
    key = rng.choice(list(tensors))
    choice = rng.randrange(7)
    if choice == 0:
        dtype = rng.choice([torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16, torch.int32,
                            torch.bool, torch.float16, torch.bfloat16, torch.float64])
        tensors[key] = tensors[key].to(dtype)
    elif choice == 1 and tensors[key].is_floating_point() and tensors[key].numel():
        flat = tensors[key].clone().reshape(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        tensors[key] = flat.reshape(tensors[key].shape)
    elif choice == 2:
        tensors[key] = tensors[key].reshape(-1)
    elif choice == 3:
        del tensors[key]
    elif choice == 4:
        tensors[rng.choice(["update/ghost", "weights/ghost", "extra", "labels", "buffers/x"])] = torch.zeros(3)
    elif choice == 5 and "labels" in tensors:
        tensors["labels"] = torch.tensor([rng.choice([-1, 10**6, 2**40]), 0])
    else:
        tensors[key] = torch.cat([tensors[key].reshape(-1), tensors[key].reshape(-1)])
    metadata = json.dumps(update.metadata())
    return _signed({k: v.contiguous() for k, v in tensors.items()}, metadata)


def _header_edit(rng: random.Random, data: bytes) -> bytes:
    header, payload = _split(data)
    entries = [k for k in header if k != "__metadata__"]
    key = rng.choice(entries)
    field_ = rng.choice(["dtype", "shape", "data_offsets", "drop", "add", "metadata"])
    if field_ == "dtype":
        header[key]["dtype"] = rng.choice(["F8_E4M3", "C64", "U64", "I64", "BOOL", "F64", "xx", 3])
    elif field_ == "shape":
        header[key]["shape"] = rng.choice([[], [0], [2**40], [-1], [1] * 64, "a", [2**31, 2**31]])
    elif field_ == "data_offsets":
        header[key]["data_offsets"] = rng.choice([[0, 0], [0, 2**62], [10, 5], [-1, 4], [0], "x"])
    elif field_ == "drop":
        del header[key]
    elif field_ == "add":
        header["update/new"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    else:
        header["__metadata__"] = rng.choice([{}, {"gradleak": 1}, [], "x", {"gradleak": "{}", "sha256": 5}])
    return _frame(header, payload)


def _foreign(rng: random.Random, path: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / MARKER}",))

    choice = rng.randrange(8)
    if choice == 0:
        return pickle.dumps(Payload(), protocol=rng.randrange(pickle.HIGHEST_PROTOCOL + 1))
    if choice == 1:
        return pickle.dumps({"update/w": [1.0, 2.0]}, protocol=rng.randrange(pickle.HIGHEST_PROTOCOL + 1))
    if choice == 2:
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buffer)
        return buffer.getvalue()
    if choice == 3:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("data.pkl", pickle.dumps(Payload()))
        return buffer.getvalue()
    if choice == 4:
        return json.dumps({"gradleak": {"format": "gradleak.update"}}).encode()
    if choice == 5:
        return rng.randbytes(rng.randrange(64))
    if choice == 6:
        return b""
    return b"\x80\x04" + rng.randbytes(rng.randrange(6, 200))


def _special(rng: random.Random, path: Path) -> Path:
    choice = rng.randrange(6)
    if choice == 0:
        path.mkdir()
    elif choice == 1:
        os.mkfifo(path)
    elif choice == 2:
        path.symlink_to("/dev/zero")
    elif choice == 3:
        path.symlink_to(path)
    elif choice == 4:
        return path.with_name("missing-" + path.name)
    else:
        return path.with_name("n" * 300)
    return path


def common_mutation(rng: random.Random, kind: str, data: bytes, path: Path) -> tuple[bool, bytes | None, Path]:
    """The mutations every file surface shares: ``flip`` (a few bytes changed), ``truncate``,
    ``foreign`` (pickles, zips, JSON, bytes) and ``special`` (folders, FIFOs, links, missing and
    over-long names). Returns (handled, bytes to write or None, the path to feed)."""
    if kind == "flip":
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return True, bytes(mutated), path
    if kind == "truncate":
        return True, data[: rng.randrange(len(data))], path
    if kind == "foreign":
        return True, _foreign(rng, path), path
    if kind == "special":
        return True, None, _special(rng, path)
    return False, None, path


def hostile_inputs(folder: Path, n: int, seed: int = 0,
                   updates: list[SharedUpdate] | None = None) -> "list[tuple[str, Path]]":
    """Write ``n`` hostile inputs into ``folder`` (created): ``[(kind, path)]``, seeded."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    updates = updates or seed_updates()
    originals = [save_update(u, folder / f"seed-{k}.safetensors").read_bytes() for k, u in enumerate(updates)]
    inputs = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        k = rng.randrange(len(updates))
        data, path = originals[k], folder / f"input-{index:06d}.safetensors"
        handled, out, path = common_mutation(rng, kind, data, path)
        if handled:
            pass
        elif kind == "length":
            value = rng.choice([0, 1, 7, len(data), len(data) - 9, 2**63, 2**26, rng.randrange(2**64)])
            out = struct.pack("<Q", value) + data[8:]
        elif kind == "header":
            out = _header_edit(rng, data)
        elif kind == "metadata":
            out = _metadata_edit(rng, updates[k])
        else:
            out = _payload_edit(rng, updates[k])
        if out is not None:
            path.write_bytes(out)
        inputs.append((kind, path))
    return inputs


def _check_usable(update: SharedUpdate) -> None:
    """A loaded update must be what it claims: finite tensors of allowed dtypes and, when it
    describes a zoo model, a model that builds from the description and accepts it."""
    from ..models import model_from_info

    for name, tensor in update.tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name!r} is not finite floating point")
    if update.model is not None:
        update.validate_for(model_from_info(update.model, expected=update.parameters))


def run_campaign(folder: Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Campaign:
    """Generate ``n`` hostile update files and load each; count what happened."""
    campaign = run_inputs("updates", hostile_inputs(folder, n, seed), load_update, _check_usable,
                          describe=str, progress=progress)
    if (folder / MARKER).exists():
        campaign.side_effects.append("a pickle payload ran")
    return campaign


run = run_campaign  # the surface's entry point for gradleak.fuzz.run_surface
