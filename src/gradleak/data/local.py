"""Local data sets from a path the user gives (gradleak never downloads data).

Supported layouts, all read without torchvision:

- an image folder: class subfolders (``root/<class>/<image>``, label = index of the sorted
  subfolder name) or a flat folder of images (one class named after the folder); decoded
  with Pillow, center-cropped and resized.
- CIFAR-10 / CIFAR-100 "python version" batches, the extracted ``cifar-10-batches-py`` or
  ``cifar-100-python`` folder. These are pickle files, read with a restricted unpickler
  that can rebuild numpy arrays and builtin containers and nothing else.
- MNIST / Fashion-MNIST idx files (``t10k-images-idx3-ubyte`` ..., optionally ``.gz``).

:func:`load_dataset` picks a built-in data set by name or detects the layout of a path.
Every failure is a :class:`~gradleak.errors.DataError` naming the path and the condition.

Local files are untrusted input. Sizes are checked before anything is allocated and nothing
blocks (files are opened non-blocking and must be regular files): image folders in
:mod:`gradleak.data._folder` (``MAX_IMAGE_PIXELS`` = 40 million pixels read from the header,
``MAX_IMAGE_BYTES``, ``MAX_FOLDER_ENTRIES``), pickles in :mod:`gradleak.data._unpickle`
(``MAX_PICKLE_BYTES`` = 1 GiB, checked stand-ins for every global), idx files here
(``MAX_IDX_BYTES`` = 1 GiB of data, claimed sizes checked against the file, gzip read up to
the claimed size only).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, one_line
from ._files import existing_dir, open_regular, printable, quote
from ._folder import (
    IMAGE_EXTENSIONS,
    MAX_FOLDER_ENTRIES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    list_image_folder,
    load_image_folder,
    load_listing,
)
from ._unpickle import MAX_PICKLE_BYTES, RestrictedUnpickler, safe_unpickle
from .builtin import (
    BUILTIN_DATASETS,
    DIGIT_CLASSES,
    LabeledImages,
    check_available,
    check_count,
    check_size,
    load_builtin,
)

__all__ = ["load_image_folder", "load_cifar", "load_mnist_idx", "load_dataset", "read_idx", "IMAGE_EXTENSIONS",
           "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES", "MAX_FOLDER_ENTRIES", "MAX_PICKLE_BYTES", "MAX_IDX_BYTES",
           "RestrictedUnpickler", "safe_unpickle"]

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_SPLITS = ("train", "test")
#: Data bytes one idx file may hold (EMNIST's largest file is ~550 MB); checked from the header.
MAX_IDX_BYTES = 2**30
_GZIP_MAX_RATIO = 1032  # deflate never expands more than this: a claim beyond it cannot be honest


def _check_split(split: str, where: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"{where}: split must be 'train' or 'test', got {split!r}")
    return split


def _plain_keys(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{quote(path)}: expected a pickled dict, got {type(value).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items() if isinstance(k, (str, bytes))}


# ---------------------------------------------------------------- CIFAR


def _cifar_root(path: Path) -> tuple[Path, int] | None:
    """(folder holding the batches, 10 or 100), looking in ``path`` and its usual subfolders."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "batches.meta").is_file():
            return folder, 10
        if (folder / "meta").is_file() and ((folder / "test").is_file() or (folder / "train").is_file()):
            return folder, 100
    return None


def _cifar_classes(meta_file: Path, names_key: str) -> tuple[str, ...]:
    meta = _plain_keys(safe_unpickle(meta_file), meta_file)
    names = meta.get(names_key)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, (str, bytes)) for c in names):
        raise DataError(f"load_cifar: the meta file {quote(meta_file)} has no non-empty list of names {names_key!r}")
    return tuple(printable(c.decode("latin1") if isinstance(c, bytes) else c) for c in names)


def _label_array(value: Any, where: str, key: str, count: int, n_classes: int) -> np.ndarray:
    """Integer labels, one per image, in [0, n_classes)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
            raise DataError(f"load_cifar: {where}: {key!r} must be a list of integers")
        try:
            value = np.array(value, dtype=np.int64)
        except OverflowError:
            raise DataError(f"load_cifar: {where}: {key!r} holds integers too large for int64") from None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        found = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise DataError(f"load_cifar: {where}: {key!r} must be a 1-d list or array of integer labels, got {found}")
    if value.shape[0] != count:
        raise DataError(f"load_cifar: {where}: {count} images but {value.shape[0]} {key!r}")
    if count and (int(value.min()) < 0 or int(value.max()) >= n_classes):
        raise DataError(f"load_cifar: {where}: {key!r} must lie in [0, {n_classes - 1}] (one per class), found "
                        f"[{int(value.min())}, {int(value.max())}]")
    return value.astype(np.int64)


def _cifar_batch(file: Path, labels_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels) of one batch file, validated."""
    batch = _plain_keys(safe_unpickle(file), file)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"load_cifar: {quote(file)}: 'data' must be a uint8 array N x 3072, got {found}")
    if labels_key not in batch:
        raise DataError(f"load_cifar: {quote(file)}: no {labels_key!r} entry")
    labels = _label_array(batch[labels_key], quote(file), labels_key, data.shape[0], n_classes)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(path: str | os.PathLike, split: str = "test", n: int | None = None) -> LabeledImages:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``; fine labels) from the extracted python-version folder
    (or its parent). Images 3x32x32 in [0, 1]; class names from the meta file.

    The batches are pickles, read by :func:`~gradleak.data._unpickle.safe_unpickle`: only
    numpy arrays and builtin containers, each file at most ``MAX_PICKLE_BYTES`` (1 GiB)."""
    folder = existing_dir(path, "load_cifar")
    split = _check_split(split, "load_cifar")
    found = _cifar_root(folder)
    if found is None:
        raise DataError(
            f"load_cifar: {quote(folder)} is not a CIFAR folder (expected 'batches.meta' + 'test_batch' / "
            "'data_batch_1..5' for CIFAR-10, or 'meta' + 'test' / 'train' for CIFAR-100)"
        )
    root, kind = found
    names_key, labels_key = ("label_names", "labels") if kind == 10 else ("fine_label_names", "fine_labels")
    classes = _cifar_classes(root / ("batches.meta" if kind == 10 else "meta"), names_key)
    if kind == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(f"load_cifar: {quote(root)} lacks the {split} batch file(s) {', '.join(missing)}")
    wanted = check_count(n, "load_cifar")
    images, labels, total = [], [], 0
    for name in files:
        data, batch_labels = _cifar_batch(root / name, labels_key, len(classes))
        images.append(data)
        labels.append(batch_labels)
        total += data.shape[0]
        if wanted is not None and total >= wanted:
            break
    count = check_available(wanted, total, f"load_cifar({quote(root)}, split={split!r})")
    if count == 0:
        raise DataError(f"load_cifar: the {split} batches in {quote(root)} hold no images")
    label_array = np.concatenate(labels)[:count]
    pixels = torch.from_numpy(np.concatenate(images)[:count].astype(np.float32) / 255.0)
    return LabeledImages(pixels, torch.from_numpy(label_array), classes, f"cifar{kind}-{split}")


# ---------------------------------------------------------------- MNIST idx

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _exactly(stream, count: int, where: str, what: str) -> bytes:
    data = stream.read(count)
    if len(data) < count:
        raise DataError(f"{where}: truncated header ({what})")
    return data


def _idx_header(stream, where: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(header bytes, dims, dtype) from the first bytes of an idx stream."""
    magic_bytes = stream.read(4)
    if len(magic_bytes) < 4:
        raise DataError(f"{where}: truncated header ({len(magic_bytes)} bytes, the magic number needs 4)")
    magic = int.from_bytes(magic_bytes, "big")
    if magic_bytes[0] != 0 or magic_bytes[1] != 0:
        raise DataError(f"{where}: wrong magic number 0x{magic:08x} (expected 0x0000, a type code and ndim, e.g. "
                        "0x00000803 for MNIST images, 0x00000801 for labels)")
    code, ndim = magic_bytes[2], magic_bytes[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{where}: wrong magic number 0x{magic:08x}: type code 0x{code:02x} is not an idx type "
                        f"(expected one of {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise DataError(f"{where}: wrong magic number 0x{magic:08x}: ndim is 0 (expected >= 1)")
    header = 4 + 4 * ndim
    raw_dims = _exactly(stream, 4 * ndim, where, f"{ndim} dims need {header} bytes")
    dims = tuple(int.from_bytes(raw_dims[4 * k : 4 * k + 4], "big") for k in range(ndim))
    return header, dims, np.dtype(_IDX_DTYPES[code])


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """One idx file (plain or ``.gz``): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
    uint32 sizes, then the data. The sizes the header claims are checked before any data is
    read: against ``max_bytes`` (default :data:`MAX_IDX_BYTES`, 1 GiB), against the file size
    (plain files) or the most a gzip stream of that size can expand to; a ``.gz`` file is
    decompressed up to the claimed size plus one byte, never further (a gzip bomb is refused)."""
    path = Path(path)
    where = f"idx file {quote(path)}"
    gz = path.suffix == ".gz"
    handle, size = open_regular(path, "idx file", max_bytes + 4 + 4 * 255)
    try:
        with handle, (gzip.GzipFile(fileobj=handle, mode="rb") if gz else handle) as stream:
            header, dims, dtype = _idx_header(stream, where)
            expected = math.prod(dims) * dtype.itemsize
            if expected > max_bytes:
                raise DataError(f"{where}: dims {dims} claim {expected} data bytes, over the limit of {max_bytes}")
            if gz and expected > size * _GZIP_MAX_RATIO + 1024:
                raise DataError(f"{where}: dims {dims} claim {expected} data bytes, more than a {size}-byte gzip "
                                "file can hold")
            if not gz and size - header != expected:
                state = "truncated" if size - header < expected else "has trailing bytes"
                raise DataError(f"{where}: {state}: dims {dims} need {expected} data bytes, found {size - header}")
            raw = stream.read(expected + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{where}: cannot read ({type(error).__name__}: {one_line(error)})") from None
    if len(raw) != expected:
        state, found = ("truncated", str(len(raw))) if len(raw) < expected else ("has trailing bytes", "more (decompressed no further)")
        raise DataError(f"{where}: {state}: dims {dims} need {expected} data bytes, found {found}")
    return np.frombuffer(raw, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    prefix, rank = ("t10k" if split == "test" else "train"), (3 if kind == "images" else 1)
    for where in (folder, folder / "raw"):
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = where / f"{prefix}-{kind}{sep}idx{rank}-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def load_mnist_idx(path: str | os.PathLike, split: str = "test", n: int | None = None) -> LabeledImages:
    """MNIST-style idx files from a folder (or its ``raw`` subfolder):
    ``t10k-images-idx3-ubyte`` + ``t10k-labels-idx1-ubyte`` (``train-...`` for
    ``split="train"``), plain or ``.gz``, read by :func:`read_idx`. Images 1xHxW in [0, 1].
    Class names are the digits, or the Fashion-MNIST names when the folder path mentions
    "fashion"."""
    folder = existing_dir(path, "load_mnist_idx")
    split = _check_split(split, "load_mnist_idx")
    arrays, files = {}, {}
    for kind, rank in (("images", 3), ("labels", 1)):
        file = _find_idx(folder, split, kind)
        if file is None:
            prefix = "t10k" if split == "test" else "train"
            raise DataError(f"load_mnist_idx: {quote(folder)} has no {prefix}-{kind}-idx{rank}-ubyte[.gz]")
        arrays[kind] = array = read_idx(file)
        files[kind] = file
        if array.ndim != rank or array.dtype != np.uint8:
            raise DataError(f"idx file {quote(file)}: expected {rank}-d uint8 {kind}, got {array.dtype} {array.shape}")
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"load_mnist_idx: {images.shape[0]} images but {labels.shape[0]} labels (in "
                        f"{quote(files['images'])} and {quote(files['labels'])})")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"idx file {quote(files['images'])}: holds no images (dims {images.shape})")
    fashion = any("fashion" in part.lower() for part in folder.resolve().parts[-2:])
    classes = FASHION_CLASSES if fashion else DIGIT_CLASSES
    count = check_available(check_count(n, "load_mnist_idx"), images.shape[0], f"load_mnist_idx({quote(folder)})")
    if int(labels[:count].max()) >= len(classes):
        raise DataError(f"idx file {quote(files['labels'])}: labels must lie in [0, {len(classes) - 1}], found "
                        f"{int(labels[:count].max())}")
    pixels = torch.from_numpy(images[:count, None].astype(np.float32) / 255.0)
    targets = torch.from_numpy(labels[:count].astype(np.int64))
    name = f"{'fashion-mnist' if fashion else 'mnist'}-{split}"
    return LabeledImages(pixels, targets, classes, name)


# ---------------------------------------------------------------- dispatch


def load_dataset(
    source: str | os.PathLike, *, size: int | None = None, n: int | None = None, split: str = "test"
) -> LabeledImages:
    """A built-in data set by name (``photos``, ``faces``, ``digits``) or a local path,
    detected as a CIFAR folder, an MNIST idx folder or an image folder (in that order).
    ``size`` resizes (an image folder defaults to 32); ``split`` applies to CIFAR and MNIST.
    Local files are untrusted input: see :func:`load_image_folder`, :func:`load_cifar` and
    :func:`read_idx` for the limits that apply."""
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return load_builtin(source, size=size, n=n)
    if size is not None:
        size = check_size(size, "load_dataset")
    path = Path(source).expanduser()
    if not os.path.lexists(path):
        raise DataError(
            f"load_dataset: {quote(source)} is neither a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}) "
            "nor an existing path"
        )
    folder = existing_dir(path, "load_dataset")
    if _cifar_root(folder) is not None:
        data = load_cifar(folder, split=split, n=n)
    elif _find_idx(folder, _check_split(split, "load_dataset"), "images") is not None:
        data = load_mnist_idx(folder, split=split, n=n)
    else:
        listing = list_image_folder(folder)
        if not listing.entries and not listing.skipped:
            raise DataError(
                f"load_dataset: the format of {quote(folder)} is not recognised; expected a CIFAR python folder "
                "('batches.meta' or 'meta' + batches), MNIST idx files ('t10k-images-idx3-ubyte[.gz]' and "
                "labels), or image files (directly or in class subfolders)"
            )
        return load_listing(listing, 32 if size is None else size, n, 3, MAX_IMAGE_PIXELS)
    return data if size is None else data.resize(size)
