"""Image folders from an untrusted path: bounded listing, no blocking, sizes checked before decoding.

Limits (module constants, documented in :func:`load_image_folder`):

- :data:`MAX_IMAGE_PIXELS` (40 million, e.g. 6324 x 6324): an image whose header claims more
  pixels is refused from its header, before anything is decoded (a "decompression bomb").
  Pillow's own global ``PIL.Image.MAX_IMAGE_PIXELS`` is left alone; its warning is silenced
  only around the header read, and its error is turned into ours.
- :data:`MAX_IMAGE_BYTES` (512 MiB): the size of one image file.
- :data:`MAX_FOLDER_ENTRIES` (1 million): directory entries listed, root and class
  subfolders together (the listing must be complete to be sorted, so it is bounded instead).
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError, one_line
from ._files import open_regular, printable, quote
from .builtin import LabeledImages, check_available, check_count, check_resized, check_size, pil_to_tensor_chw

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES", "MAX_FOLDER_ENTRIES",
           "FolderListing", "list_image_folder", "load_image_folder", "load_listing"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
#: The Pillow decoders that may run, whatever a file's content claims (no EPS: it runs Ghostscript).
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP", "PPM")
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 512 * 2**20
MAX_FOLDER_ENTRIES = 1_000_000
_WHERE = "load_image_folder"


@dataclass
class FolderListing:
    """What an image folder holds: class names, ``(file, label)`` in sorted order, and the
    entries named like images that were skipped because they are not regular files."""

    root: Path
    classes: tuple[str, ...] = ()
    entries: list[tuple[Path, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan(folder: Path, root: Path, budget: list[int]) -> tuple[list[str], list[str], list[str]]:
    """(image file names, subfolder names, skipped names) of one folder, each sorted. Symbolic
    links to folders and regular files are followed wherever they lead (``mydata/fish ->
    /data/imagenet/n01443537`` is how data sets are assembled); dangling links, link loops,
    FIFOs, devices (``/dev/zero``) and sockets named like images are skipped, never opened.
    Only the root and one level of class folders are listed, so directory links cannot loop."""
    files, folders, skipped = [], [], []
    try:
        scanner = os.scandir(folder)
    except OSError as error:
        raise DataError(f"{_WHERE}: cannot list {quote(folder)} ({one_line(error.strerror or error)})") from None
    with scanner:
        for entry in scanner:
            budget[0] -= 1
            if budget[0] < 0:
                raise DataError(f"{_WHERE}: {quote(root)} holds more than {MAX_FOLDER_ENTRIES} entries (the "
                                "listing limit, MAX_FOLDER_ENTRIES); split the folder or point at a subfolder")
            name = entry.name
            if name.startswith("."):
                continue
            image = _is_image_name(name)
            try:
                if not entry.is_symlink():
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(name)
                    elif image:
                        (files if entry.is_file(follow_symlinks=False) else skipped).append(name)
                    continue
                mode = os.stat(entry.path).st_mode
            except OSError:  # a dangling link or a link loop
                if image:
                    skipped.append(name)
                continue
            if stat.S_ISDIR(mode):
                folders.append(name)
            elif image:
                (files if stat.S_ISREG(mode) else skipped).append(name)
    return sorted(files), sorted(folders), sorted(skipped)


def list_image_folder(root: Path) -> FolderListing:
    """The listing of an image folder: class subfolders (label = index of the sorted subfolder
    name, subfolders without images skipped) or, without any, the root's own images as one
    class named after the folder. Bounded by :data:`MAX_FOLDER_ENTRIES`."""
    root_real = os.path.realpath(root)
    budget = [MAX_FOLDER_ENTRIES]
    files, folders, skipped = _scan(root, root, budget)
    per_class = []
    for name in folders:
        class_files, _, class_skipped = _scan(root / name, root, budget)
        skipped += [os.path.join(name, s) for s in class_skipped]
        if class_files:
            per_class.append((printable(name), [root / name / f for f in class_files]))
    if not per_class:  # flat folder: one class named after the folder
        per_class = [(printable(Path(root_real).name) or "images", [root / f for f in files])]
    classes = tuple(name for name, _ in per_class)
    entries = [(file, label) for label, (_, paths) in enumerate(per_class) for file in paths]
    return FolderListing(root, classes, entries, skipped)


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _open_image(handle, file: Path, max_pixels: int) -> Image.Image:
    """Pillow's lazy open (header only), refusing more than ``max_pixels`` pixels."""
    where = f"{_WHERE}: image {quote(file)}"
    Image.init()  # registers Pillow's plugins once (MPO, TIFF and WEBP are not preloaded)
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle, formats=formats)
    except Image.DecompressionBombError as error:
        found = _BOMB_PIXELS.search(str(error))
        pixels = found.group(1) if found else "too many"
        raise DataError(f"{where}: {pixels} pixels exceeds the limit of {max_pixels} pixels (MAX_IMAGE_PIXELS); "
                        "refused before decoding") from None
    except UnidentifiedImageError:
        raise DataError(f"{_WHERE}: cannot decode image {quote(file)} (not a {', '.join(formats)} image)") from None
    except Exception as error:  # noqa: BLE001 - Pillow's plugins raise many types on hostile headers
        raise DataError(f"{_WHERE}: cannot decode image {quote(file)} ({type(error).__name__}: "
                        f"{one_line(error)})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(f"{where}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                        "pixels (MAX_IMAGE_PIXELS); refused before decoding")
    return image


def _to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """The first frame, EXIF-oriented, 16-bit grayscale scaled to 8 bits, transparency dropped."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale (PNG, TIFF)
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # float TIFF: taken as [0, 1]
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        image = Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA") and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    return pil_to_tensor_chw(image, size, channels)


def decode_image(file: Path, size: int, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image file as float32 C,H,W in [0, 1]: opened without blocking, size-checked from
    its header, then decoded (first frame only)."""
    handle, _ = open_regular(file, f"{_WHERE}: image", MAX_IMAGE_BYTES)
    with handle:
        image = _open_image(handle, file, max_pixels)
        try:
            with image:
                return _to_array(image, size, channels)
        except DataError:
            raise
        except Exception as error:  # noqa: BLE001 - truncated or corrupt data: OSError, SyntaxError, ...
            raise DataError(f"{_WHERE}: cannot decode image {quote(file)} ({type(error).__name__}: "
                            f"{one_line(error)})") from None


def load_listing(listing: FolderListing, size: int, n: int | None, channels: int, max_pixels: int) -> LabeledImages:
    """Decode the first ``n`` entries of a listing (no other file is opened)."""
    root = listing.root
    if not listing.entries:
        note = ""
        if listing.skipped:
            shown = ", ".join(repr(s) for s in listing.skipped[:3]) + (", ..." if len(listing.skipped) > 3 else "")
            note = f"; skipped {len(listing.skipped)} entries that are not regular files: {shown}"
        raise DataError(f"{_WHERE}: no images in {quote(root)} (expected files ending in "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, directly or in class subfolders{note})")
    count = check_available(check_count(n, _WHERE), len(listing.entries), f"{_WHERE}({quote(root)})")
    check_resized(count, channels, size, f"{_WHERE}({quote(root)})")
    arrays = [decode_image(file, size, channels, max_pixels) for file, _ in listing.entries[:count]]
    labels = torch.tensor([label for _, label in listing.entries[:count]], dtype=torch.int64)
    name = printable(Path(os.path.realpath(root)).name) or "images"
    return LabeledImages(torch.from_numpy(np.stack(arrays)), labels, listing.classes, name)


def load_image_folder(path: str | os.PathLike, size: int, n: int | None = None, channels: int = 3, *,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> LabeledImages:
    """Images from a local folder, decoded with Pillow, center-cropped to a square and
    resized to ``size`` x ``size`` (Lanczos).

    With class subfolders, label = index of the subfolder in sorted order (subfolders
    without images are skipped, and images directly in the root are ignored); otherwise the
    folder's own images form one class named after the folder. Files are read in sorted
    order; ``n`` keeps the first ``n`` and no other file is opened. Non-image files (by
    extension), hidden files, and entries that are not regular files (FIFOs, devices, dangling
    links) are skipped; links to folders and regular files are followed. Animated or
    multi-page files give their first frame; 16-bit grayscale is scaled to 8 bits; alpha is
    dropped. Class names are made printable (control characters escaped).

    Untrusted folders are bounded: an image whose header claims more than ``max_pixels``
    pixels (default :data:`MAX_IMAGE_PIXELS` = 40,000,000) or a file over
    :data:`MAX_IMAGE_BYTES` (512 MiB) is refused before decoding, only the formats in
    :data:`IMAGE_FORMATS` are decoded, and at most :data:`MAX_FOLDER_ENTRIES` (1,000,000)
    directory entries are listed. A file that cannot be decoded is an error naming it.
    """
    from ._files import existing_dir

    root = existing_dir(path, _WHERE)
    size = check_size(size, _WHERE)
    if channels not in (1, 3):
        raise DataError(f"{_WHERE}: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"{_WHERE}: max_pixels must be a positive integer, got {max_pixels!r}")
    return load_listing(list_image_folder(root), size, n, channels, max_pixels)
