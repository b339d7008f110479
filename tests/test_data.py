"""The data layer: built-in real images and local data sets (image folders, CIFAR batches,
MNIST idx files). Local files are written in tmp_path from the built-in real images."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradleak.data import (
    BUILTIN_DATASETS,
    PHOTO_NAMES,
    LabeledImages,
    load_builtin,
    load_cifar,
    load_dataset,
    load_digits,
    load_faces,
    load_image_folder,
    load_mnist_idx,
    load_photos,
    read_idx,
)
from gradleak.errors import DataError


@pytest.fixture(scope="module")
def photos() -> LabeledImages:
    return load_photos(size=32)


@pytest.fixture(scope="module")
def digits() -> LabeledImages:
    return load_digits()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N,C,H,W float in [0, 1] -> N,H,W,C uint8."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------- built-ins


def test_photos_shapes_labels_and_content(photos):
    assert photos.images.shape == (10, 3, 32, 32) and photos.images.dtype == torch.float32
    assert photos.shape == (3, 32, 32) and len(photos) == 10
    assert 0.0 <= float(photos.images.min()) and float(photos.images.max()) <= 1.0
    assert photos.labels.tolist() == list(range(10)) and photos.labels.dtype == torch.int64
    assert photos.classes == PHOTO_NAMES and photos.name == "photos"
    flat = photos.images.flatten(1)
    assert bool((flat.std(dim=1) > 0.03).all()), "every photo has real contrast"
    assert float(torch.cdist(flat, flat).add(torch.eye(10) * 1e3).min()) > 1.0, "no two photos alike"


def test_photo_is_center_crop_of_the_original(photos):
    import skimage.data

    original = skimage.data.chelsea().astype(np.float64) / 255.0  # 300 x 451
    left = (451 - 300) // 2
    crop_mean = original[:, left : left + 300].mean(axis=(0, 1))
    index = PHOTO_NAMES.index("chelsea")
    assert np.allclose(photos.images[index].mean(dim=(1, 2)).numpy(), crop_mean, atol=0.01)
    uncropped_mean = original.mean(axis=(0, 1))
    assert not np.allclose(crop_mean, uncropped_mean, atol=0.003)  # the crop matters


def test_photos_deterministic_subset_grayscale_and_size(photos):
    again = load_photos(size=32, n=3)
    assert torch.equal(again.images, photos.images[:3]) and again.labels.tolist() == [0, 1, 2]
    gray = load_photos(size=32, channels=1)
    assert gray.images.shape == (10, 1, 32, 32)
    luma = (photos.images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert float((gray.images - luma).abs().mean()) < 0.01
    assert load_photos(size=64, n=1).images.shape == (1, 3, 64, 64)
    for bad in (0, -3, 2.5, "32", True):
        with pytest.raises(DataError, match="size"):
            load_photos(size=bad)
    with pytest.raises(DataError, match="channels"):
        load_photos(channels=2)
    with pytest.raises(DataError, match="n=11"):
        load_photos(n=11)


def test_faces_order_and_values():
    import skimage.data

    faces = load_faces()
    assert faces.images.shape == (200, 1, 25, 25) and faces.classes == ("non-face", "face")
    assert faces.labels[:100].eq(1).all() and faces.labels[100:].eq(0).all()
    assert np.allclose(faces.images[:, 0].numpy(), skimage.data.lfw_subset(), atol=1e-6)
    resized = load_faces(n=8, size=32)
    assert resized.images.shape == (8, 1, 32, 32) and resized.labels.tolist() == [1] * 8
    assert 0.0 <= float(resized.images.min()) and float(resized.images.max()) <= 1.0
    assert abs(float(resized.images.mean()) - float(faces.images[:8].mean())) < 0.02


def test_digits_values_labels_and_resize(digits):
    from sklearn.datasets import load_digits as sk_digits

    assert digits.images.shape == (1797, 1, 8, 8) and digits.classes == tuple("0123456789")
    assert float(digits.images.max()) == 1.0 and float(digits.images.min()) == 0.0
    scaled = digits.images * 16
    assert torch.equal(scaled, scaled.round()), "values are the original 0..16 levels / 16"
    assert digits.labels.tolist() == sk_digits().target.tolist()
    big = load_digits(n=20, size=16)
    assert big.images.shape == (20, 1, 16, 16) and torch.equal(big.labels, digits.labels[:20])
    assert abs(float(big.images.mean()) - float(digits.images[:20].mean())) < 0.03


def test_load_builtin_names_and_errors():
    assert set(BUILTIN_DATASETS) == {"photos", "faces", "digits"}
    assert load_builtin("photos", n=2).shape == (3, 32, 32)
    assert load_builtin("digits", size=12, n=4).shape == (1, 12, 12)
    with pytest.raises(DataError, match="digits, faces, photos"):
        load_builtin("cifar")
    with pytest.raises(DataError, match="size"):
        load_builtin("faces", size=0)
    with pytest.raises(TypeError):
        BUILTIN_DATASETS["mine"] = load_photos  # type: ignore[index]


def test_labeled_images_methods_and_validation(digits):
    assert len(digits.take(5)) == 5 and torch.equal(digits.take(5).images, digits.images[:5])
    for bad in (0, len(digits) + 1):
        with pytest.raises(DataError, match="take"):
            digits.take(bad)
    picked = digits.select([3, 0, 3])
    assert picked.labels.tolist() == [3, 0, 3] and torch.equal(picked.images[1], digits.images[0])
    with pytest.raises(DataError, match="indices"):
        digits.select([0, 5000])
    double = digits.take(2).to(dtype=torch.float64)
    assert double.images.dtype == torch.float64 and double.labels.dtype == torch.int64
    with pytest.raises(DataError, match="floating"):
        digits.to(dtype=torch.int32)
    images = digits.images[:2]
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        LabeledImages(images * 2, digits.labels[:2], digits.classes, "x")
    with pytest.raises(DataError, match="2 images but 3 labels"):
        LabeledImages(images, digits.labels[:3], digits.classes, "x")
    with pytest.raises(DataError, match="4 dims"):
        LabeledImages(images[:, 0], digits.labels[:2], digits.classes, "x")
    with pytest.raises(DataError, match="labels must lie"):
        LabeledImages(images, torch.tensor([0, 10]), digits.classes, "x")


# ---------------------------------------------------------------- image folders


def test_image_folder_with_classes(tmp_path, photos):
    pixels = to_uint8(photos.images)
    (tmp_path / "cats").mkdir()
    (tmp_path / "astro").mkdir()
    (tmp_path / "empty").mkdir()
    Image.fromarray(pixels[1]).save(tmp_path / "cats" / "a.png")
    Image.fromarray(pixels[1]).save(tmp_path / "cats" / "b.jpg", quality=95)
    Image.fromarray(pixels[0]).save(tmp_path / "astro" / "x.png")
    (tmp_path / "astro" / "notes.txt").write_text("not an image")
    (tmp_path / "astro" / ".hidden.png").write_bytes(b"junk")
    data = load_image_folder(tmp_path, 32)
    assert data.classes == ("astro", "cats") and data.labels.tolist() == [0, 1, 1]
    assert torch.equal(data.images[0], torch.from_numpy(pixels[0]).permute(2, 0, 1).float() / 255)
    assert float((data.images[2] - photos.images[1]).abs().mean()) < 0.02  # JPEG is lossy
    assert load_image_folder(tmp_path, 16, n=2, channels=1).images.shape == (2, 1, 16, 16)


def test_image_folder_flat_center_crop(tmp_path, photos):
    folder = tmp_path / "shots"
    folder.mkdir()
    strip = np.zeros((32, 96, 3), np.uint8)
    strip[:, 32:64] = to_uint8(photos.images[2:3])[0]  # real photo in the middle, black sides
    Image.fromarray(strip).save(folder / "wide.png")
    data = load_image_folder(folder, 32)
    assert data.classes == ("shots",) and data.labels.tolist() == [0]
    assert float((data.images[0] - photos.images[2]).abs().max()) <= 1 / 255 + 1e-6


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 32)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, 32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, 32)


# ---------------------------------------------------------------- CIFAR pickles


def write_cifar10(root: Path, photos: LabeledImages, protocol: int = 2, bytes_keys: bool = False) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    data = to_uint8(photos.images).transpose(0, 3, 1, 2).reshape(10, 3072)
    meta = {key("label_names"): list(photos.classes), key("num_cases_per_batch"): 10}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    batch = {key("data"): data, key("labels"): list(range(10)), key("batch_label"): "testing batch 1 of 1"}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    for i in range(5):
        part = {key("data"): data[2 * i : 2 * i + 2], key("labels"): np.arange(2 * i, 2 * i + 2)}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(part, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol,bytes_keys", [(2, False), (2, True), (4, False), (5, False)])
def test_cifar10_batches(tmp_path, photos, protocol, bytes_keys):
    folder = write_cifar10(tmp_path, photos, protocol, bytes_keys)
    test = load_cifar(folder)
    assert test.images.shape == (10, 3, 32, 32) and test.name == "cifar10-test"
    assert test.classes == PHOTO_NAMES and test.labels.tolist() == list(range(10))
    assert float((test.images - photos.images).abs().max()) <= 0.5 / 255 + 1e-6
    train = load_cifar(tmp_path, split="train", n=3)  # parent folder works too
    assert train.labels.tolist() == [0, 1, 2] and torch.equal(train.images, test.images[:3])
    assert len(load_cifar(folder, split="train")) == 10
    with pytest.raises(DataError, match="split"):
        load_cifar(folder, split="val")


def test_cifar_pickle_from_numpy_1(tmp_path, photos):
    """Pickles written by numpy < 2 (as the CIFAR archives were) name numpy.core.multiarray."""
    folder = write_cifar10(tmp_path, photos)
    legacy = (folder / "test_batch").read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in legacy
    (folder / "test_batch").write_bytes(legacy)
    assert torch.equal(load_cifar(folder).images, load_cifar(folder, split="train").images)


def test_cifar100_layout(tmp_path, digits):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rgb = digits.take(6).resize(32).images.repeat(1, 3, 1, 1)
    names = [f"class{i}" for i in range(100)]
    meta = {"fine_label_names": names, "coarse_label_names": names[:20]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    labels = [5, 99, 0, 1, 2, 3]
    batch = {"data": to_uint8(rgb).transpose(0, 3, 1, 2).reshape(6, -1), "fine_labels": labels, "coarse_labels": [0] * 6}
    (folder / "test").write_bytes(pickle.dumps(batch))
    data = load_cifar(folder)
    assert data.name == "cifar100-test" and len(data.classes) == 100 and data.labels.tolist() == labels
    with pytest.raises(DataError, match="train"):
        load_cifar(folder, split="train")


class _Payload:
    """Unpickling this calls ``function(argument)``: what a malicious data file would do."""

    def __init__(self, function, argument: str):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


PAYLOADS = [
    (os.system, "touch {marker}", r"(posix|os|nt)\.system"),
    (eval, "open({marker!r}, 'w').close()", r"(__builtin__|builtins)\.eval"),
]


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("function,command,refused", PAYLOADS)
def test_malicious_pickle_is_refused_and_not_run(tmp_path, photos, function, command, refused, protocol):
    folder = write_cifar10(tmp_path, photos)
    marker = tmp_path / "pwned"
    evil = {"data": _Payload(function, command.format(marker=str(marker))), "labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(DataError, match=refused) as caught:
        load_cifar(folder)
    assert "test_batch" in str(caught.value)
    assert not marker.exists(), "the payload ran"


def test_pickle_of_other_objects_and_garbage_refused(tmp_path, photos):
    from collections import OrderedDict

    folder = write_cifar10(tmp_path, photos)
    (folder / "test_batch").write_bytes(pickle.dumps(OrderedDict(data=1)))
    with pytest.raises(DataError, match=r"collections\.OrderedDict"):
        load_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)})[:40])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_cifar(folder)


# ---------------------------------------------------------------- MNIST idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, digits: LabeledImages, gz: bool = False, split: str = "t10k") -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(digits.take(12).resize(28).images)[..., 0]
    for name, array in ((f"{split}-images-idx3-ubyte", pixels), (f"{split}-labels-idx1-ubyte", digits.labels[:12].numpy())):
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return pixels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gz(tmp_path, digits, gz):
    pixels = write_mnist(tmp_path / "mnist", digits, gz=gz)
    data = load_mnist_idx(tmp_path / "mnist", n=10)
    assert data.images.shape == (10, 1, 28, 28) and data.name == "mnist-test"
    assert data.labels.tolist() == digits.labels[:10].tolist() and data.classes == tuple("0123456789")
    assert torch.equal((data.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(pixels[:10]))
    with pytest.raises(DataError, match="train-images"):
        load_mnist_idx(tmp_path / "mnist", split="train")


def test_mnist_class_names_and_raw_subfolder(tmp_path, digits):
    write_mnist(tmp_path / "FashionMNIST" / "raw", digits, split="train")
    data = load_mnist_idx(tmp_path / "FashionMNIST", split="train")
    assert data.name == "fashion-mnist-train" and data.classes[9] == "Ankle boot"
    write_mnist(tmp_path / "MNIST" / "raw", digits, split="train")
    assert load_mnist_idx(tmp_path / "MNIST", split="train").classes[9] == "9"


def test_idx_wrong_magic_and_truncation(tmp_path, digits):
    write_mnist(tmp_path, digits)
    images = tmp_path / "t10k-images-idx3-ubyte"
    raw = images.read_bytes()
    assert read_idx(images).shape == (12, 28, 28)
    images.write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*wrong magic number 0x01020803"):
        load_mnist_idx(tmp_path)
    images.write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated: dims \\(12, 28, 28\\) need 9408 data bytes, found 9403"):
        load_mnist_idx(tmp_path)
    images.write_bytes(raw[:9])
    with pytest.raises(DataError, match="truncated header"):
        read_idx(images)
    images.write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="trailing"):
        read_idx(images)
    images.write_bytes(idx_bytes(np.zeros((11, 28, 28), np.uint8)))
    with pytest.raises(DataError, match="11 images but 12 labels"):
        load_mnist_idx(tmp_path)
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros(12, np.uint8)))[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(gz)


# ---------------------------------------------------------------- load_dataset


def test_load_dataset_detects_formats(tmp_path, photos, digits):
    assert load_dataset("faces", n=4).name == "faces"
    write_cifar10(tmp_path / "c", photos)
    cifar = load_dataset(str(tmp_path / "c"), size=16, n=4)
    assert cifar.name == "cifar10-test" and cifar.images.shape == (4, 3, 16, 16)
    write_mnist(tmp_path / "m", digits)
    assert load_dataset(tmp_path / "m").name == "mnist-test"
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(to_uint8(photos.images)[4]).save(folder / "hubble.png")
    assert load_dataset(folder).images.shape == (1, 3, 32, 32)
    assert load_dataset(folder, size=8).images.shape == (1, 3, 8, 8)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="neither a built-in data set .*nor an existing path"):
        load_dataset(str(tmp_path / "missing"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "data.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="not recognised; expected a CIFAR"):
        load_dataset(odd)
    with pytest.raises(DataError, match="is a file"):
        load_dataset(odd / "data.csv")
    with pytest.raises(DataError, match="size"):
        load_dataset(odd, size=-1)
