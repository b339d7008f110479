"""Real images that ship inside installed packages: nothing is downloaded.

Three built-in data sets, all real pictures:

- ``photos``: ten colour photographs bundled with scikit-image (``skimage.data``: astronaut,
  chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina), scikit-learn
  (``sklearn.datasets.load_sample_image``: china, flower) and matplotlib
  (``matplotlib.cbook.get_sample_data('grace_hopper.jpg')``). One class per photo.
- ``faces``: ``skimage.data.lfw_subset()``, 200 grayscale 25x25 crops from Labeled Faces
  in the Wild. The first 100 are faces, the last 100 are background crops (non-faces).
- ``digits``: ``sklearn.datasets.load_digits()``, 1,797 handwritten 8x8 digits (UCI).

Every loader returns a :class:`LabeledImages`: float tensors in [0, 1], NCHW, with int64
labels and class names. Resizing uses Pillow with an antialiasing filter (Lanczos).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError
from ..limits import MAX_SIDE, check_pixels, short_repr

__all__ = [
    "LabeledImages",
    "load_photos",
    "load_faces",
    "load_digits",
    "load_builtin",
    "BUILTIN_DATASETS",
    "PHOTO_NAMES",
]

#: The photos of :func:`load_photos`, in their (fixed) order; labels index this tuple.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "china",
    "flower",
    "grace_hopper",
)

FACE_CLASSES: tuple[str, ...] = ("non-face", "face")
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


@dataclass(frozen=True, eq=False)
class LabeledImages:
    """A batch of real images with labels: ``images`` (N, C, H, W) float in [0, 1],
    ``labels`` (N,) int64 indexing ``classes``, and the data set's ``name``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        where = f"LabeledImages {self.name!r}"
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise DataError(f"{where}: images and labels must be torch tensors")
        if images.ndim != 4:
            raise DataError(f"{where}: images must be N,C,H,W (4 dims), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise DataError(f"{where}: images must be a floating-point tensor, got {images.dtype}")
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise DataError(f"{where}: labels must be a 1-d integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[0] < 1:
            raise DataError(f"{where}: holds no images")
        if not bool(torch.isfinite(images).all()):
            raise DataError(f"{where}: images contain NaN or infinite values")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"{where}: image values must lie in [0, 1], found [{low:.4g}, {high:.4g}]")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise DataError(f"{where}: classes must name at least one class")
        lmin, lmax = int(labels.min()), int(labels.max())
        if lmin < 0 or lmax >= len(classes):
            raise DataError(f"{where}: labels must lie in [0, {len(classes) - 1}] (one per class), found [{lmin}, {lmax}]")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "labels", labels.to(torch.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"LabeledImages(name={self.name!r}, n={len(self)}, shape={self.shape}, classes={len(self.classes)})"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def take(self, n: int) -> "LabeledImages":
        """The first ``n`` images (1 <= n <= len)."""
        n = check_count(n, f"{self.name}.take")
        if n is None or n > len(self):
            raise DataError(f"{self.name}.take: n={n} but the data set holds {len(self)} images (need 1 <= n <= {len(self)})")
        return self.select(range(n))

    def select(self, indices: Sequence[int] | torch.Tensor) -> "LabeledImages":
        """The images at ``indices`` (in that order; repeats allowed)."""
        index = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices)
        if index.numel() == 0:
            raise DataError(f"{self.name}.select: no indices given")
        if index.ndim != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise DataError(f"{self.name}.select: indices must be a flat sequence of integers, got {index.dtype} {tuple(index.shape)}")
        index = index.to(torch.int64)
        if int(index.min()) < 0 or int(index.max()) >= len(self):
            raise DataError(f"{self.name}.select: indices must lie in [0, {len(self) - 1}], got [{int(index.min())}, {int(index.max())}]")
        index = index.to(self.images.device)
        return LabeledImages(self.images[index], self.labels[index.to(self.labels.device)], self.classes, self.name)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LabeledImages":
        """A copy with images cast to ``dtype`` (floating) and both tensors on ``device``."""
        if dtype is not None and not dtype.is_floating_point:
            raise DataError(f"{self.name}.to: images must stay floating point, got dtype={dtype}")
        images = self.images.to(dtype=dtype, device=device)
        labels = self.labels.to(device=device)
        return LabeledImages(images, labels, self.classes, self.name)

    def resize(self, size: int) -> "LabeledImages":
        """Every image resized to ``size`` x ``size`` with Pillow (Lanczos, antialiased)."""
        size = check_size(size, f"{self.name}.resize")
        if self.shape[1:] == (size, size):
            return self
        check_resized(len(self), self.shape[0], size, f"{self.name}.resize")
        arrays = self.images.detach().cpu().double().numpy()
        out = np.stack([resize_float_chw(a, size) for a in arrays])
        images = torch.from_numpy(out).to(dtype=self.images.dtype, device=self.images.device)
        return LabeledImages(images, self.labels, self.classes, self.name)


# ---------------------------------------------------------------- validation helpers


def check_size(size: object, where: str) -> int:
    """``size`` as an int in 1..:data:`~gradleak.limits.MAX_SIDE`, or a DataError naming ``size`` and ``where``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= MAX_SIDE:
        raise DataError(f"{where}: size must be an integer in 1..{MAX_SIDE} (pixels per side), got {short_repr(size)}")
    return int(size)


def check_resized(count: int, channels: int, size: int, where: str) -> None:
    """``count`` images resized to ``size`` fit the pixel budget (checked before any is resized)."""
    try:
        check_pixels(where, count, channels, size)
    except ConfigError as error:
        raise DataError(str(error)) from None


def check_count(n: object, where: str) -> int | None:
    """``n`` as a positive int or None, or a DataError naming ``n``."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise DataError(f"{where}: n must be a positive integer or None, got {n!r}")
    return int(n)


def check_available(n: int | None, available: int, where: str) -> int:
    """How many items to load: all when ``n`` is None, else ``n`` if there are enough."""
    if n is None:
        return available
    if n > available:
        raise DataError(f"{where}: n={n} but only {available} images are available")
    return n


# ---------------------------------------------------------------- Pillow conversions


def pil_to_tensor_chw(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Center-crop a Pillow image to a square, resize it to ``size`` (Lanczos) and return
    float32 C,H,W in [0, 1] with ``channels`` 1 (grayscale) or 3 (RGB)."""
    mode = "L" if channels == 1 else "RGB"
    image = image.convert(mode)
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def resize_float_chw(array: np.ndarray, size: int) -> np.ndarray:
    """Resize a float C,H,W array in [0, 1] to C,size,size with Pillow (Lanczos per
    channel, mode "F"), center-cropping non-square images first; clipped to [0, 1]."""
    channels, height, width = array.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array = array[:, top : top + side, left : left + side]
    out = np.empty((channels, size, size), dtype=np.float32)
    for c in range(channels):
        plane = Image.fromarray(np.ascontiguousarray(array[c], dtype=np.float32), mode="F")
        out[c] = np.asarray(plane.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------- the photos


def _photo(name: str) -> Image.Image:
    """One bundled photo as a Pillow RGB image (decoded by its package or by Pillow)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg", asfileobj=True) as handle:
            image = Image.open(handle)
            image.load()
        return image.convert("RGB")
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype != np.uint8:
        raise DataError(f"skimage.data.{name}: expected a uint8 image, got {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def load_photos(size: int = 32, n: int | None = None, channels: int = 3) -> LabeledImages:
    """The ten bundled colour photos (see :data:`PHOTO_NAMES`), center-cropped to a square
    and resized to ``size`` x ``size``; label = photo index, classes = photo names.

    Sources: ``skimage.data`` (7 photos), ``sklearn.datasets.load_sample_image`` (china,
    flower), ``matplotlib.cbook.get_sample_data('grace_hopper.jpg')``. ``channels=1`` gives
    grayscale (ITU-R 601 luma, Pillow's "L"). ``n`` keeps the first ``n`` photos.
    """
    size = check_size(size, "load_photos")
    if channels not in (1, 3):
        raise DataError(f"load_photos: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    count = check_available(check_count(n, "load_photos"), len(PHOTO_NAMES), "load_photos")
    arrays = [pil_to_tensor_chw(_photo(name), size, channels) for name in PHOTO_NAMES[:count]]
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.arange(count, dtype=torch.int64)
    return LabeledImages(images, labels, PHOTO_NAMES, "photos")


# ---------------------------------------------------------------- faces and digits


def load_faces(n: int | None = None, size: int | None = None) -> LabeledImages:
    """``skimage.data.lfw_subset()``: 200 real 25x25 grayscale crops from Labeled Faces in
    the Wild, in the package's order: indices 0-99 are faces (label 1), 100-199 are
    background crops (label 0). ``classes = ("non-face", "face")``.

    The order is kept as shipped, so ``take(k)`` for k <= 100 gives only faces; use
    ``select`` for a mix. ``size`` resizes with Pillow (Lanczos).
    """
    import skimage.data

    raw = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
    if raw.shape != (200, 25, 25):
        raise DataError(f"skimage.data.lfw_subset: expected shape (200, 25, 25), got {raw.shape}")
    count = check_available(check_count(n, "load_faces"), raw.shape[0], "load_faces")
    images = np.clip(raw[:count, None].astype(np.float32), 0.0, 1.0)
    labels = torch.zeros(raw.shape[0], dtype=torch.int64)
    labels[:100] = 1
    data = LabeledImages(torch.from_numpy(images), labels[:count], FACE_CLASSES, "faces")
    return data if size is None else data.resize(check_size(size, "load_faces"))


def load_digits(n: int | None = None, size: int | None = None) -> LabeledImages:
    """``sklearn.datasets.load_digits()``: 1,797 real handwritten 8x8 digits (UCI optical
    recognition of handwritten digits), values 0..16 scaled to [0, 1], labels 0-9, in the
    package's order. ``size`` resizes with Pillow (Lanczos)."""
    from sklearn.datasets import load_digits as _sklearn_digits

    bunch = _sklearn_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)
    count = check_available(check_count(n, "load_digits"), raw.shape[0], "load_digits")
    images = torch.from_numpy(np.clip(raw[:count, None] / 16.0, 0.0, 1.0))
    labels = torch.as_tensor(np.asarray(bunch.target[:count]), dtype=torch.int64)
    data = LabeledImages(images, labels, DIGIT_CLASSES, "digits")
    return data if size is None else data.resize(check_size(size, "load_digits"))


def _photos_builtin(size: int | None = None, n: int | None = None) -> LabeledImages:
    """10 colour photos from scikit-image, scikit-learn and matplotlib, square-cropped (default 32 px), 10 classes."""
    return load_photos(size=32 if size is None else size, n=n)


def _faces_builtin(size: int | None = None, n: int | None = None) -> LabeledImages:
    """LFW subset from scikit-image: 200 grayscale 25x25 crops, 100 faces (label 1) then 100 non-faces (label 0)."""
    return load_faces(n=n, size=size)


def _digits_builtin(size: int | None = None, n: int | None = None) -> LabeledImages:
    """scikit-learn's 1,797 handwritten digits, 8x8 grayscale, 10 classes."""
    return load_digits(n=n, size=size)


#: Name -> loader taking ``(size=None, n=None)``. Read-only.
BUILTIN_DATASETS: Mapping[str, Callable[..., LabeledImages]] = types.MappingProxyType(
    {"photos": _photos_builtin, "faces": _faces_builtin, "digits": _digits_builtin}
)


def load_builtin(name: str, *, size: int | None = None, n: int | None = None) -> LabeledImages:
    """Load a built-in data set by name: ``photos`` (size defaults to 32), ``faces``
    (25x25 native) or ``digits`` (8x8 native)."""
    loader = BUILTIN_DATASETS.get(name) if isinstance(name, str) else None
    if loader is None:
        raise DataError(f"unknown built-in data set {name!r}; valid names: {', '.join(sorted(BUILTIN_DATASETS))}")
    if size is not None:
        check_size(size, f"load_builtin({name!r})")
    return loader(size=size, n=n)
