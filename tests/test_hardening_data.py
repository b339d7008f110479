"""Untrusted data and run folders: every hostile input is one DataError line naming the file
and the failed condition, sizes are checked before anything is allocated, nothing in a file
runs, and nothing blocks. Images are real (scikit-image's astronaut and camera)."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import threading
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from gradleak.attacks.base import Reconstruction
from gradleak.cli import app
from gradleak.data import load_cifar, load_dataset, load_image_folder, load_mnist_idx, read_idx
from gradleak.data import _folder
from gradleak.data._files import open_regular
from gradleak.data._unpickle import safe_unpickle
from gradleak.errors import DataError, GradleakError
from gradleak.runs import load_run, load_truth, rebuild_report, save_truth, write_run

try:
    from numpy._core import multiarray, numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray, numeric  # type: ignore[no-redef]

ASTRONAUT = np.array(Image.fromarray(skimage.data.astronaut()).resize((48, 48), Image.Resampling.LANCZOS))
CAMERA = np.array(Image.fromarray(skimage.data.camera()).resize((48, 48), Image.Resampling.LANCZOS))


def refused(call, *needles, kind=DataError):
    """Run ``call``; it must raise ``kind`` with one line that contains every needle."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert isinstance(caught.value, GradleakError) and "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def within(seconds, call):
    """``call()`` in a thread; fail instead of hanging when it does not return in time."""
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def cli_fails(args, *needles):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def photo_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ASTRONAUT).save(root / "a.png")
    return root


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, a few KB (streamed through zlib, nothing big in memory)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row, packer = b"\x00" * (1 + (width + 7) // 8), zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- image folders: decompression bombs


@pytest.fixture(scope="module")
def big_pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    Image.new("1", (12000, 12000)).save(folder / "large.png")  # Pillow warns on it, then decodes it
    (folder / "bomb.png").write_bytes(bilevel_png(20000, 20000))  # Pillow raises on it
    return folder


@pytest.mark.parametrize("name,needle", [("large.png", "12000x12000 = 144000000 pixels"),
                                         ("bomb.png", "400000000 pixels")])
def test_huge_images_are_refused_from_their_header(tmp_path, big_pngs, name, needle):
    limit_before = Image.MAX_IMAGE_PIXELS
    photo_folder(tmp_path / "f")
    shutil.copy(big_pngs / name, tmp_path / "f" / f"b-{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not reach the user
        refused(lambda: load_image_folder(tmp_path / "f", 32), f"b-{name}", needle, "limit of 40000000 pixels")
        refused(lambda: load_dataset(tmp_path / "f"), needle)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # no global state touched
    assert len(load_image_folder(tmp_path / "f", 32, n=1)) == 1  # the photo before it still loads


def test_max_pixels_applies_to_real_photos(tmp_path):
    photo_folder(tmp_path)
    refused(lambda: load_image_folder(tmp_path, 16, max_pixels=2000), "48x48 = 2304 pixels", "a.png")
    assert load_image_folder(tmp_path, 16).images.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- image folders: hostile entries


def _fifo(path):
    os.mkfifo(path)


def _symlink_to(target):
    return lambda path: os.symlink(target, path)


SKIPPED = {  # entries named like images that are not regular files: skipped, never opened
    "fifo": _fifo,
    "loop": lambda path: os.symlink(path.name, path),
    "dangling": _symlink_to("missing.png"),
}


@pytest.mark.parametrize("make", SKIPPED.values(), ids=SKIPPED.keys())
def test_special_entries_are_skipped_without_blocking(tmp_path, make):
    folder = photo_folder(tmp_path / "f")
    make(folder / "b.png")
    data = within(10, lambda: load_image_folder(folder, 16))
    assert len(data) == 1
    (folder / "a.png").unlink()
    refused(lambda: within(10, lambda: load_image_folder(folder, 16)), "no images", "not regular files: 'b.png'")


def test_a_fifo_opened_directly_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    refused(lambda: within(10, lambda: open_regular(tmp_path / "x.png", "image", 100)), "/x.png'", "is a FIFO")
    refused(lambda: within(10, lambda: read_idx(tmp_path / "x.png")), "is a FIFO")
    refused(lambda: within(10, lambda: safe_unpickle(tmp_path / "x.png")), "is a FIFO")


def test_links_to_devices_are_skipped_and_links_to_files_elsewhere_followed(tmp_path):
    """A class folder or image linked from elsewhere is how data sets are assembled; a link to a
    device is never opened."""
    Image.fromarray(CAMERA).save(tmp_path / "outside.png")
    folder = photo_folder(tmp_path / "f")
    os.symlink(tmp_path / "outside.png", folder / "b.png")
    os.symlink("/dev/zero", folder / "c.png")
    data = within(10, lambda: load_image_folder(folder, 16))
    assert len(data) == 2
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(CAMERA).save(tmp_path / "elsewhere" / "x.png")
    classes = tmp_path / "classes"
    photo_folder(classes / "astronaut")
    os.symlink(tmp_path / "elsewhere", classes / "camera")
    data = within(10, lambda: load_image_folder(classes, 16))
    assert data.classes == ("astronaut", "camera") and data.labels.tolist() == [0, 1]


def test_links_inside_the_folder_and_a_directory_named_like_an_image(tmp_path):
    folder = photo_folder(tmp_path / "f")
    os.symlink("a.png", folder / "b.png")
    (folder / "c.png").mkdir()
    data = load_image_folder(folder, 16)
    assert len(data) == 2 and torch.equal(data.images[0], data.images[1])


BROKEN = {
    "truncated png": lambda: _png_bytes(ASTRONAUT)[:300],
    "zero bytes": lambda: b"",
    "text named jpg": lambda: b"just some notes, not a picture\n",
    "eps named png (would run Ghostscript)": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
}


def _png_bytes(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("content", BROKEN.values(), ids=BROKEN.keys())
def test_undecodable_files_are_one_line_naming_the_file(tmp_path, content):
    folder = photo_folder(tmp_path / "f")
    (folder / "b.jpg").write_bytes(content())
    refused(lambda: load_image_folder(folder, 16), "cannot decode image", "b.jpg")
    assert len(load_image_folder(folder, 16, n=1)) == 1  # only what is asked for is opened


def test_frames_depths_and_colour_modes(tmp_path):
    f = tmp_path / "f"
    f.mkdir()
    astro, camera = Image.fromarray(ASTRONAUT), Image.fromarray(CAMERA).convert("RGB")
    astro.save(f / "1-frames.tiff", save_all=True, append_images=[camera])
    astro.save(f / "2-animated.gif", save_all=True, append_images=[camera], duration=100, loop=0)
    Image.fromarray(CAMERA.astype(np.uint16) * 257).save(f / "3-sixteen-bit.png")
    astro.convert("CMYK").save(f / "4-cmyk.tiff")
    palette = astro.quantize(64)
    palette.save(f / "5-palette-transparent.png", transparency=0)
    astro.convert("RGBA").save(f / "6-rgba.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_image_folder(f, 48)
    exact = torch.from_numpy(ASTRONAUT).permute(2, 0, 1).float() / 255
    assert torch.equal(data.images[0], exact)  # first TIFF frame, lossless
    assert float((data.images[1] - exact).abs().mean()) < 0.05  # first GIF frame (palette-quantised)
    gray = torch.from_numpy(CAMERA).float() / 255
    assert torch.equal(data.images[2], gray.expand(3, -1, -1))  # 16 bits scaled to 8, not clipped to white
    assert torch.equal(data.images[3], exact) and torch.equal(data.images[5], exact)
    assert float((data.images[4] - exact).abs().mean()) < 0.05


def test_only_the_files_asked_for_are_opened_and_listing_is_bounded(tmp_path, monkeypatch):
    folder = photo_folder(tmp_path / "f")
    for k in range(300):
        (folder / f"z{k:03d}.png").write_bytes(b"")  # would fail if opened
    opened = []
    real_open = _folder.open_regular
    monkeypatch.setattr(_folder, "open_regular", lambda *a: opened.append(a[0]) or real_open(*a))
    assert len(load_image_folder(folder, 16, n=1)) == 1 and len(opened) == 1
    monkeypatch.setattr(_folder, "MAX_FOLDER_ENTRIES", 100)
    refused(lambda: load_image_folder(folder, 16, n=1), "more than 100 entries", "MAX_FOLDER_ENTRIES", "/f'")


def test_odd_class_folder_names(tmp_path):
    root = tmp_path / "classes"
    names = ["a b", "é", "new\nline", "<b>&", "[red]"]
    for name in names:
        Image.fromarray(CAMERA).save(photo_folder(root / name) / "c.png")
    os.makedirs(os.fsencode(root) + b"/\xff\xfe")
    Image.fromarray(CAMERA).save(os.fsencode(root) + b"/\xff\xfe/c.png")
    data = load_image_folder(root, 16)
    assert data.classes == ("<b>&", "[red]", "a b", "new\\nline", "é", "\\udcff\\udcfe")
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    for name in data.classes:
        name.encode("utf-8")  # printable, encodable: safe in reports
    (root / "new\nline" / "d.png").write_bytes(b"broken")
    refused(lambda: load_image_folder(root, 16), "/new\\nline/d.png'")


def test_cli_attack_on_a_hostile_image_folder(tmp_path, big_pngs):
    folder = photo_folder(tmp_path / "f")
    shutil.copy(big_pngs / "large.png", folder / "0.png")
    cli_fails(["attack", "--data", folder, "--n", "1", "--out", tmp_path / "o"], "0.png", "12000x12000")


# ---------------------------------------------------------------- MNIST idx


def idx(code: int, dims, data: bytes = b"") -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims) + data


def mnist_folder(root: Path, images: bytes | None = None, labels: bytes | None = None, gz=False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pixels = np.stack([CAMERA[:28, :28], CAMERA[20:, 20:]])
    suffix = ".gz" if gz else ""
    images = images if images is not None else idx(8, pixels.shape, pixels.tobytes())
    (root / f"t10k-images-idx3-ubyte{suffix}").write_bytes(gzip.compress(images) if gz else images)
    (root / "t10k-labels-idx1-ubyte").write_bytes(labels if labels is not None else idx(8, (2,), bytes([3, 7])))
    return root


IDX_CASES = {
    "dims claim 2**62 bytes": (idx(8, (2**31, 2**31), b"\0" * 16), "claim 4611686018427387904 data bytes, over"),
    "truncated data": (idx(8, (2, 28, 28), b"\0" * 100), "truncated: dims (2, 28, 28) need 1568 data bytes, found 100"),
    "wrong magic": (b"\x12\x34\x08\x03" + b"\0" * 12, "wrong magic number 0x12340803"),
    "wrong dtype code": (idx(7, (2, 28, 28), b"\0" * 1568), "type code 0x07 is not an idx type"),
    "no dims": (b"\0\0\x08\0", "ndim is 0"),
    "truncated header": (b"\0\0\x08\x03\0\0", "truncated header"),
    "float images": (idx(0x0D, (2, 28, 28), b"\0" * 6272), "expected 3-d uint8 images"),
    "no images": (idx(8, (0, 28, 28)), "0 images but 2 labels"),
}


@pytest.mark.parametrize("content,needle", IDX_CASES.values(), ids=IDX_CASES.keys())
def test_idx_headers_are_checked_before_reading(tmp_path, content, needle):
    folder = mnist_folder(tmp_path / "m", images=content)
    refused(lambda: load_mnist_idx(folder), "t10k-images-idx3-ubyte", needle)


def test_idx_labels_out_of_range(tmp_path):
    folder = mnist_folder(tmp_path / "m", labels=idx(8, (2,), bytes([3, 10])))
    refused(lambda: load_mnist_idx(folder), "t10k-labels-idx1-ubyte", "labels must lie in [0, 9], found 10")


@pytest.mark.parametrize("dims,extra,needle", [
    ((2, 28, 28), 50_000_000, "has trailing bytes"),              # a bomb behind an honest header
    ((60000, 28, 28), 0, "more than a"),                          # a claim no small gzip can hold
    ((2**31, 2**31), 0, "over the limit"),
])
def test_gzip_bombs_are_not_expanded(tmp_path, dims, extra, needle):
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container, streamed: nothing big in memory
    body = packer.compress(idx(8, dims, b"\0" * min(1568, extra or 1568)))
    body += b"".join(packer.compress(b"\0" * 2**20) for _ in range(extra // 2**20)) + packer.flush()
    folder = mnist_folder(tmp_path / "m")
    (folder / "t10k-images-idx3-ubyte").unlink()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(body)
    tracemalloc.start()
    try:
        refused(lambda: load_mnist_idx(folder), "t10k-images-idx3-ubyte.gz", needle)
        assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    finally:
        tracemalloc.stop()
    assert len(load_mnist_idx(mnist_folder(tmp_path / "ok", gz=True))) == 2


def test_cli_attack_on_a_hostile_idx_file(tmp_path):
    folder = mnist_folder(tmp_path / "m", images=idx(8, (2**31, 2**31)))
    cli_fails(["attack", "--data", folder, "--n", "1", "--out", tmp_path / "o"], "t10k-images-idx3-ubyte", "over the limit")


# ---------------------------------------------------------------- CIFAR pickles


class Reduce:
    """Pickles as ``function(*args)`` (then ``BUILD`` with ``state``): what a hostile batch can say."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def cifar_folder(root: Path, batch=None, raw: bytes | None = None, protocol: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["astronaut", "camera"] + [f"c{k}" for k in range(8)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=protocol))
    images = np.stack([ASTRONAUT[:32, :32], np.repeat(CAMERA[:32, :32, None], 3, axis=2)])
    good = {"data": images.transpose(0, 3, 1, 2).reshape(2, 3072), "labels": [0, 1]}
    batch = {k: v for k, v in {**good, **(batch or {})}.items() if v is not None}
    (folder / "test_batch").write_bytes(raw if raw is not None else pickle.dumps(batch, protocol=protocol))
    return folder


HUGE = (2**34,)  # 16 GiB if it were allocated
CIFAR_CASES = {
    "os.system": ({"data": Reduce(os.system, ("touch {marker}",))}, "refused to unpickle global posix.system"),
    "eval": ({"data": Reduce(eval, ("open({marker!r}, 'w')",))}, ".eval (a data batch"),
    "getattr": ({"data": Reduce(getattr, ("abc", "upper"))}, ".getattr (a data batch"),
    "data not N x 3072": ({"data": np.zeros((2, 1024), np.uint8)},
                          "'data' must be a uint8 array N x 3072, got uint8 array of shape (2, 1024)"),
    "data float": ({"data": np.zeros((2, 3072))}, "got float64 array"),
    "labels count": ({"labels": [0, 1, 2]}, "2 images but 3 'labels'"),
    "labels out of range": ({"labels": [0, 10]}, "'labels' must lie in [0, 9] (one per class), found [0, 10]"),
    "labels text": ({"labels": ["cat", "dog"]}, "'labels' must be a list of integers"),
    "labels missing": ({"labels": None}, "no 'labels' entry"),
    "object array": ({"labels": np.array([0, "x"], dtype=object)}, "is not a plain numeric dtype"),
    "huge _reconstruct": ({"data": Reduce(multiarray._reconstruct, (np.ndarray, HUGE, b"b"),
                                         (1, HUGE, np.dtype("u1"), False, b"\0" * 10))},
                          "claims 17179869184 bytes but the pickle carries 10"),
    "huge _frombuffer": ({"data": Reduce(numeric._frombuffer, (b"\0" * 10, np.dtype("u1"), HUGE, "C"))},
                         "claims 17179869184 bytes"),
    "ndarray called": ({"data": Reduce(np.ndarray, (HUGE,))}, "numpy.ndarray may not be called"),
    "bytes of a size": ({"data": Reduce(bytes, (2**34,))}, "never an int size"),
    "sub-array dtype": ({"data": Reduce(np.dtype, ("u1", False, True),
                                        (3, "|", (np.dtype("u1"), HUGE), None, None, -1, -1, 0))},
                        "structured, sub-array or annotated dtypes are not data"),
}


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("batch,needle", CIFAR_CASES.values(), ids=CIFAR_CASES.keys())
def test_hostile_cifar_batches(tmp_path, batch, needle, protocol):
    marker = tmp_path / "pwned"
    batch = {k: Reduce(v.function, tuple(a.format(marker=str(marker)) if isinstance(a, str) else a for a in v.args),
                       v.state) if isinstance(v, Reduce) else v for k, v in batch.items()}
    folder = cifar_folder(tmp_path, batch, protocol=protocol)
    tracemalloc.start()
    try:
        refused(lambda: load_cifar(folder), "test_batch", needle)
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()
    assert not marker.exists(), "the payload ran"


DEPTH = 200_000
RAW_CASES = {
    "truncated": (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:-40],
                  "not a readable pickle"),
    "not a pickle": (lambda: b"label,data\n0,1 2 3\n", "not a readable pickle"),
    "nested list": (lambda: b"\x80\x02}(X\x04\x00\x00\x00data" + b"]" * DEPTH + b"a" * (DEPTH - 1) + b"u.", "got list"),
    "nested tuple as key": (lambda: b"\x80\x02}N" + b"\x85" * DEPTH + b"Ns.",  # the C unpickler would crash hashing it
                            "dict keys must be str, bytes or numbers, got tuple"),
    "BUILD on a function": (lambda: b"\x80\x02c_codecs\nencode\n}b.", "BUILD may only restore"),
}


@pytest.mark.parametrize("content,needle", RAW_CASES.values(), ids=RAW_CASES.keys())
def test_malformed_and_deeply_nested_pickles(tmp_path, content, needle):
    folder = cifar_folder(tmp_path, raw=content())
    refused(lambda: load_cifar(folder), "test_batch", needle)


def test_python2_style_array_text_and_size_limit(tmp_path):
    text = "".join(map(chr, range(6)))  # Python 2 pickles carry array bytes as latin-1 text
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(Reduce(multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                                         (1, (2, 3), np.dtype("u1"), False, text)), protocol=2))
    assert safe_unpickle(path).tolist() == [[0, 1, 2], [3, 4, 5]]
    refused(lambda: safe_unpickle(path, max_bytes=100), "/batch'", "exceeds the limit of 100 bytes")
    folder = cifar_folder(tmp_path / "big")
    with open(folder / "test_batch", "r+b") as handle:
        handle.truncate(2**30 + 1)  # sparse: refused from its size, never read
    refused(lambda: load_cifar(folder), "test_batch", "1073741825 bytes exceeds the limit of 1073741824 bytes")


def test_cli_attack_on_a_hostile_cifar_folder(tmp_path):
    marker = tmp_path / "pwned"
    cifar_folder(tmp_path / "c", {"data": Reduce(os.system, (f"touch {marker}",))})
    cli_fails(["attack", "--data", tmp_path / "c", "--n", "1", "--out", tmp_path / "o"], "test_batch", "posix.system")
    assert not marker.exists()


# ---------------------------------------------------------------- run folders and ground truth


@pytest.fixture(scope="module")
def genuine_run(tmp_path_factory):
    originals = torch.from_numpy(np.stack([ASTRONAUT[:32, :32], ASTRONAUT[16:, 16:]])).permute(0, 3, 1, 2).float() / 255
    reconstruction = Reconstruction(images=(originals + 0.02).clamp(0, 1), labels=torch.tensor([0, 1]),
                                    history={"loss": [3.0, 2.0, 1.0], "psnr[0]": {"x": [0, 2], "y": [10.0, "inf"]}},
                                    notes=["a note"], attack="fc-bias")
    run = tmp_path_factory.mktemp("runs") / "run"
    write_run(run, reconstruction, originals=originals, true_labels=torch.tensor([0, 1]), use_lpips=False)
    return run


def _tensors(run: Path, **changes) -> bytes:
    from safetensors.torch import load as st_load, save as st_save

    tensors = st_load((run / "reconstruction.safetensors").read_bytes())
    tensors.update(changes)
    return st_save({k: v for k, v in tensors.items() if v is not None})


RUN_CASES = {
    "history a list": ("history.json", b"[]", "must hold a JSON object (curve name -> values), got a list"),
    "history series an int": ("history.json", b'{"loss": 3}', "entry 'loss' must be a list of numbers, got a number"),
    "history value text": ("history.json", b'{"loss": [1, "x"]}', "entry 'loss'[1] must be a number"),
    "history without y": ("history.json", b'{"psnr": {"x": [1]}}', 'entry \'psnr\' is an object without a "y" list'),
    "history x and y": ("history.json", b'{"p": {"x": [1], "y": [1, 2]}}', "has 1 x values but 2 y values"),
    "per_image an int": ("metrics.json", b'{"per_image": 3}', "entry 'per_image' must be a list of objects, got a number"),
    "per_image index": ("metrics.json", b'{"per_image": [{"index": 7, "matched_to": 0, "psnr": 9}]}',
                        "'per_image'[0].index is 7 but"),
    "per_image matched_to": ("metrics.json", b'{"per_image": [{"index": 0, "matched_to": -1, "psnr": 9}]}',
                             "'per_image'[0].matched_to must be a non-negative integer"),
    "per_image psnr": ("metrics.json", b'{"per_image": [{"index": 0, "matched_to": 0, "psnr": "x"}]}',
                       "'per_image'[0].psnr must be a number"),
    "per_image without psnr": ("metrics.json", b'{"per_image": [{"index": 0, "matched_to": 0}]}',
                               "'per_image'[0] has no 'psnr'"),
    "summary a list": ("metrics.json", b'{"summary": []}', "entry 'summary' must be an object, got a list"),
    "metrics a list": ("metrics.json", b"[1]", "must hold a JSON object, got a list"),
    "config not an object": ("config.json", b'"hello"', "must hold a JSON object, got a string"),
    "invalid JSON": ("metrics.json", b'{"attack": ', "invalid JSON (Expecting value"),
    "not UTF-8": ("history.json", b'{"loss": "\xff\xfe"}', "not UTF-8 text (byte 0xff at offset 10)"),
    "nested too deeply": ("history.json", b"[" * 100_000, "invalid JSON (nested too deeply)"),
    "tensors a pickle": ("reconstruction.safetensors", pickle.dumps({"images": [1.0]}), "refused: it is a Python pickle"),
    "tensors garbage": ("reconstruction.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{" + b"z" * 40,
                        "header is not valid JSON"),
    "tensors short": ("reconstruction.safetensors", b"abc", "too short to be a safetensors file"),
}


@pytest.mark.parametrize("name,content,needle", RUN_CASES.values(), ids=RUN_CASES.keys())
def test_tampered_run_files(tmp_path, genuine_run, name, content, needle):
    run = shutil.copytree(genuine_run, tmp_path / "run")
    (run / name).write_bytes(content)
    refused(lambda: rebuild_report(run), name, needle)


def test_zip_archive_instead_of_tensors(tmp_path, genuine_run):
    run = shutil.copytree(genuine_run, tmp_path / "run")
    torch.save({"images": torch.zeros(1, 3, 4, 4)}, run / "reconstruction.safetensors")
    refused(lambda: load_run(run), "reconstruction.safetensors", "zip archive")


TENSOR_CASES = {
    "images int": (dict(images=torch.zeros(2, 3, 32, 32, dtype=torch.int32)),
                   "'images' must be a floating-point tensor (float16/32/64, bfloat16), got torch.int32"),
    "originals NaN": (dict(originals=torch.full((2, 3, 32, 32), float("nan"))), "'originals' holds NaN or infinite values"),
    "images 3-d": (dict(images=torch.zeros(2, 32, 32)), "'images' must have shape (N, 1 or 3, H, W), got (2, 32, 32)"),
    "originals mismatch": (dict(originals=torch.zeros(2, 3, 16, 16)), "'originals' of shape (2, 3, 16, 16) does not match"),
    "originals range": (dict(originals=torch.full((2, 3, 32, 32), 3.0)), "'originals' must lie in [0, 1]"),
    "labels float": (dict(labels=torch.zeros(2)), "'labels' must be a 1-d integer tensor, got torch.float32"),
    "labels uint64": (dict(labels=torch.zeros(2, dtype=torch.uint64)), "'labels' must be a 1-d integer tensor"),
    "images float8": (dict(images=torch.zeros(2, 3, 32, 32, dtype=torch.float8_e4m3fn)), "got torch.float8_e4m3fn"),
    "labels count": (dict(true_labels=torch.zeros(5, dtype=torch.int64)),
                     "'true_labels' has 5 labels but 'originals' has 2"),
    "too many images": (dict(images=torch.zeros(100_001, 1, 1, 1), originals=None, labels=None),
                        "exceeds the limits of 100000 images"),
}


@pytest.mark.parametrize("changes,needle", TENSOR_CASES.values(), ids=TENSOR_CASES.keys())
def test_tampered_reconstruction_tensors(tmp_path, genuine_run, changes, needle):
    run = shutil.copytree(genuine_run, tmp_path / "run")
    (run / "reconstruction.safetensors").write_bytes(_tensors(run, **changes))
    refused(lambda: rebuild_report(run), "reconstruction.safetensors", needle)


def test_unmatched_counts_and_a_stale_picture_link(tmp_path, genuine_run):
    run = shutil.copytree(genuine_run, tmp_path / "run")
    (run / "metrics.json").write_text('{"attack": "fc-bias"}')
    (run / "reconstruction.safetensors").write_bytes(_tensors(run, originals=torch.zeros(3, 3, 32, 32), true_labels=None))
    refused(lambda: rebuild_report(run), "reconstruction.safetensors", "3 'originals' but 2 'images'")
    (run / "reconstruction.safetensors").write_bytes(_tensors(run, images=None, labels=None))
    (tmp_path / "private.txt").write_text("not for the report")
    (run / "grid.png").unlink()
    os.symlink(tmp_path / "private.txt", run / "grid.png")
    refused(lambda: rebuild_report(run), "grid.png", "is a symbolic link; the report would embed it")
    assert "not for the report" not in (run / "report.html").read_text()


def test_missing_files_a_file_and_a_fifo_as_run_folders(tmp_path, genuine_run):
    assert rebuild_report(shutil.copytree(genuine_run, tmp_path / "ok")).is_file()  # the genuine one rebuilds
    run = shutil.copytree(genuine_run, tmp_path / "run")
    (run / "metrics.json").unlink()
    refused(lambda: rebuild_report(run), "is not a gradleak run folder", "metrics.json missing")
    refused(lambda: rebuild_report(run / "history.json"), "is not a gradleak run folder", "it is a file")
    os.mkfifo(run / "metrics.json")
    refused(lambda: within(10, lambda: rebuild_report(run)), "metrics.json", "is a FIFO")
    (run / "metrics.json").unlink()
    with open(run / "metrics.json", "wb") as handle:
        handle.truncate(64 * 2**20 + 1)
    refused(lambda: rebuild_report(run), "metrics.json", "exceeds the limit of 67108864 bytes")


def test_cli_report_on_a_tampered_run(tmp_path, genuine_run):
    run = shutil.copytree(genuine_run, tmp_path / "run")
    (run / "metrics.json").write_text('{"per_image": 3}')
    cli_fails(["report", run], "metrics.json", "'per_image' must be a list")


def test_ground_truth_files(tmp_path):
    images = (torch.from_numpy(ASTRONAUT[None, :32, :32]).permute(0, 3, 1, 2).float() / 255).contiguous()
    assert torch.equal(load_truth(save_truth(tmp_path / "t.safetensors", images, torch.tensor([1])))[0], images)
    cases = {
        "pickle": (pickle.dumps({"images": images}), "refused: it is a Python pickle"),
        "nan": (dict(images=torch.full_like(images, float("nan")), labels=torch.tensor([1])), "'images' holds NaN"),
        "range": (dict(images=images * 4, labels=torch.tensor([1])), "'images' must lie in [0, 1]"),
        "labels float": (dict(images=images, labels=torch.tensor([1.0])), "'labels' must be a 1-d integer tensor"),
        "count": (dict(images=images, labels=torch.tensor([1, 2])), "1 'images' but 2 'labels'"),
        "missing": (dict(pixels=images), "expected entries 'images' and 'labels', found 'pixels'"),
        "negative": (dict(images=images, labels=torch.tensor([-3])), "negative label (-3)"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file(content, path)
        refused(lambda: load_truth(path), f"{name}.safetensors", needle)
    refused(lambda: load_truth(tmp_path / "none"), "ground truth file not found", "/none'")
    os.mkfifo(tmp_path / "fifo")
    refused(lambda: within(10, lambda: load_truth(tmp_path / "fifo")), "fifo", "is a FIFO")
