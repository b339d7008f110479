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
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .builtin import (
    BUILTIN_DATASETS,
    DIGIT_CLASSES,
    LabeledImages,
    check_available,
    check_count,
    check_size,
    load_builtin,
    pil_to_tensor_chw,
)

__all__ = ["load_image_folder", "load_cifar", "load_mnist_idx", "load_dataset", "read_idx", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_SPLITS = ("train", "test")


def _check_split(split: str, where: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"{where}: split must be 'train' or 'test', got {split!r}")
    return split


def _existing_dir(path: str | os.PathLike, where: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{where}: path {str(path)!r} does not exist")
    if not path.is_dir():
        raise DataError(f"{where}: path {str(path)!r} is a file, expected a folder")
    return path


# ---------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )  # fmt: skip


def _folder_entries(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of an image folder, in sorted (deterministic) order."""
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(p.name, _image_files(p)) for p in subfolders]
    per_class = [(name, files) for name, files in per_class if files]
    if not per_class:  # flat folder: one class named after the folder
        per_class = [(root.resolve().name or "images", _image_files(root))]
    classes = tuple(name for name, _ in per_class)
    entries = [(file, label) for label, (_, files) in enumerate(per_class) for file in files]
    return classes, entries


def load_image_folder(path: str | os.PathLike, size: int, n: int | None = None, channels: int = 3) -> LabeledImages:
    """Images from a local folder, decoded with Pillow, center-cropped to a square and
    resized to ``size`` x ``size`` (Lanczos).

    With class subfolders, label = index of the subfolder in sorted order (subfolders
    without images are skipped, and images directly in the root are ignored); otherwise the
    folder's own images form one class named after the folder. Files are read in sorted
    order; ``n`` keeps the first ``n``. Non-image files (by extension) and hidden files are
    skipped; a file with an image extension that Pillow cannot decode is an error.
    """
    root = _existing_dir(path, "load_image_folder")
    size = check_size(size, "load_image_folder")
    if channels not in (1, 3):
        raise DataError(f"load_image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    classes, entries = _folder_entries(root)
    if not entries:
        raise DataError(
            f"load_image_folder: no images in {str(root)!r} (expected files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, directly or in class subfolders)"
        )
    count = check_available(check_count(n, "load_image_folder"), len(entries), f"load_image_folder({str(root)!r})")
    arrays = []
    for file, _ in entries[:count]:
        try:
            with Image.open(file) as image:
                image = ImageOps.exif_transpose(image)
                arrays.append(pil_to_tensor_chw(image, size, channels))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DataError(f"load_image_folder: cannot decode image {str(file)!r}: {error}") from error
    labels = torch.tensor([label for _, label in entries[:count]], dtype=torch.int64)
    return LabeledImages(torch.from_numpy(np.stack(arrays)), labels, classes, root.resolve().name or "images")


# ---------------------------------------------------------------- restricted pickle


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles of ``bytes`` call (``_codecs.encode``), limited to latin-1."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed with latin-1 text, got {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a data pickle may name: numpy array reconstruction and containers."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    for module in ("builtins", "__builtin__"):
        for kind in (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex, bool):
            allowed[(module, kind.__name__)] = kind
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` resolves only numpy array reconstruction and
    builtin containers; any other global (``os.system``, ``builtins.eval``, ...) is refused
    with a DataError before anything is called."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refused to unpickle global {module}.{name} (a data batch may only hold "
                "numpy arrays and builtin containers; this file may be malicious)"
            ) from None


def safe_unpickle(path: Path) -> Any:
    """Read one pickle file with :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, str(path)).load()
    except DataError:
        raise
    except Exception as error:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"{str(path)!r}: not a readable pickle ({type(error).__name__}: {error})") from error


def _plain_keys(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{str(path)!r}: expected a pickled dict, got {type(value).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in value.items()}


# ---------------------------------------------------------------- CIFAR


def _cifar_root(path: Path) -> tuple[Path, int] | None:
    """(folder holding the batches, 10 or 100), looking in ``path`` and its usual subfolders."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "batches.meta").is_file():
            return folder, 10
        if (folder / "meta").is_file() and ((folder / "test").is_file() or (folder / "train").is_file()):
            return folder, 100
    return None


def load_cifar(path: str | os.PathLike, split: str = "test", n: int | None = None) -> LabeledImages:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``; fine labels) from the extracted python-version folder
    (or its parent). Images 3x32x32 in [0, 1]; class names from the meta file."""
    folder = _existing_dir(path, "load_cifar")
    split = _check_split(split, "load_cifar")
    found = _cifar_root(folder)
    if found is None:
        raise DataError(
            f"load_cifar: {str(folder)!r} is not a CIFAR folder (expected 'batches.meta' + 'test_batch' / "
            "'data_batch_1..5' for CIFAR-10, or 'meta' + 'test' / 'train' for CIFAR-100)"
        )
    root, kind = found
    meta = _plain_keys(safe_unpickle(root / ("batches.meta" if kind == 10 else "meta")), root)
    names_key, labels_key = ("label_names", "labels") if kind == 10 else ("fine_label_names", "fine_labels")
    if not isinstance(meta.get(names_key), (list, tuple)) or not meta[names_key]:
        raise DataError(f"load_cifar: the meta file in {str(root)!r} has no list {names_key!r}")
    classes = tuple(c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[names_key])
    if kind == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        files = [split]
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise DataError(f"load_cifar: {str(root)!r} lacks the {split} batch file(s) {', '.join(missing)}")
    wanted = check_count(n, "load_cifar")
    images, labels, total = [], [], 0
    for name in files:
        batch = _plain_keys(safe_unpickle(root / name), root / name)
        data, batch_labels = batch.get("data"), batch.get(labels_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise DataError(f"load_cifar: {str(root / name)!r}: 'data' must be a uint8 array N x 3072, got {shape}")
        batch_labels = np.asarray(batch_labels if batch_labels is not None else [], dtype=np.int64).reshape(-1)
        if batch_labels.shape[0] != data.shape[0]:
            count = f"{data.shape[0]} images but {batch_labels.shape[0]} {labels_key!r}"
            raise DataError(f"load_cifar: {str(root / name)!r}: {count}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
        total += data.shape[0]
        if wanted is not None and total >= wanted:
            break
    count = check_available(wanted, total, f"load_cifar({str(root)!r}, split={split!r})")
    label_array = np.concatenate(labels)[:count]
    if label_array.min() < 0 or label_array.max() >= len(classes):
        raise DataError(f"load_cifar: {str(root)!r}: labels must lie in [0, {len(classes) - 1}]")
    pixels = torch.from_numpy(np.concatenate(images)[:count].astype(np.float32) / 255.0)
    return LabeledImages(pixels, torch.from_numpy(label_array), classes, f"cifar{kind}-{split}")


# ---------------------------------------------------------------- MNIST idx

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One idx file (plain or ``.gz``): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
    uint32 sizes, then the data. The header and the data length are validated."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"idx file {str(path)!r}: cannot read ({type(error).__name__}: {error})") from error
    if len(raw) < 4:
        raise DataError(f"idx file {str(path)!r}: truncated header ({len(raw)} bytes, the magic number needs 4)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"idx file {str(path)!r}: wrong magic number 0x{magic:08x} (expected 0x0000, a type code in "
            f"{{{', '.join(hex(c) for c in _IDX_DTYPES)}}} and ndim >= 1, e.g. 0x00000803 for MNIST images, "
            "0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {str(path)!r}: truncated header ({len(raw)} bytes, {ndim} dims need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        state = "truncated" if found < expected else "has trailing bytes"
        raise DataError(f"idx file {str(path)!r}: {state}: dims {dims} need {expected} data bytes, found {found}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


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
    ``split="train"``), plain or ``.gz``. Images 1xHxW in [0, 1]. Class names are the
    digits, or the Fashion-MNIST names when the folder path mentions "fashion"."""
    folder = _existing_dir(path, "load_mnist_idx")
    split = _check_split(split, "load_mnist_idx")
    arrays = {}
    for kind, rank in (("images", 3), ("labels", 1)):
        file = _find_idx(folder, split, kind)
        if file is None:
            prefix = "t10k" if split == "test" else "train"
            raise DataError(f"load_mnist_idx: {str(folder)!r} has no {prefix}-{kind}-idx{rank}-ubyte[.gz]")
        arrays[kind] = array = read_idx(file)
        if array.ndim != rank or array.dtype != np.uint8:
            raise DataError(f"idx file {str(file)!r}: expected {rank}-d uint8 {kind}, got {array.dtype} {array.shape}")
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"load_mnist_idx: {str(folder)!r}: {images.shape[0]} images but {labels.shape[0]} labels")
    fashion = any("fashion" in part.lower() for part in folder.resolve().parts[-2:])
    count = check_available(check_count(n, "load_mnist_idx"), images.shape[0], f"load_mnist_idx({str(folder)!r})")
    pixels = torch.from_numpy(images[:count, None].astype(np.float32) / 255.0)
    targets = torch.from_numpy(labels[:count].astype(np.int64))
    name = f"{'fashion-mnist' if fashion else 'mnist'}-{split}"
    return LabeledImages(pixels, targets, FASHION_CLASSES if fashion else DIGIT_CLASSES, name)


# ---------------------------------------------------------------- dispatch


def load_dataset(
    source: str | os.PathLike, *, size: int | None = None, n: int | None = None, split: str = "test"
) -> LabeledImages:
    """A built-in data set by name (``photos``, ``faces``, ``digits``) or a local path,
    detected as a CIFAR folder, an MNIST idx folder or an image folder (in that order).
    ``size`` resizes (an image folder defaults to 32); ``split`` applies to CIFAR and MNIST."""
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return load_builtin(source, size=size, n=n)
    if size is not None:
        size = check_size(size, "load_dataset")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"load_dataset: {str(source)!r} is neither a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}) "
            "nor an existing path"
        )
    folder = _existing_dir(path, "load_dataset")
    if _cifar_root(folder) is not None:
        data = load_cifar(folder, split=split, n=n)
    elif _find_idx(folder, _check_split(split, "load_dataset"), "images") is not None:
        data = load_mnist_idx(folder, split=split, n=n)
    elif _folder_entries(folder)[1]:
        return load_image_folder(folder, 32 if size is None else size, n=n)
    else:
        raise DataError(
            f"load_dataset: the format of {str(folder)!r} is not recognised; expected a CIFAR python folder "
            "('batches.meta' or 'meta' + batches), MNIST idx files ('t10k-images-idx3-ubyte[.gz]' and "
            "labels), or image files (directly or in class subfolders)"
        )
    return data if size is None else data.resize(size)
