"""Real images: built-in samples that ship inside packages, and local data sets from a path."""

from .builtin import (
    BUILTIN_DATASETS,
    PHOTO_NAMES,
    LabeledImages,
    load_builtin,
    load_digits,
    load_faces,
    load_photos,
)
from .local import IMAGE_EXTENSIONS, load_cifar, load_dataset, load_image_folder, load_mnist_idx, read_idx
from .spec import CIFAR10_SPEC, IMAGENET_SPEC, MNIST_SPEC, DataSpec

__all__ = [
    "DataSpec",
    "CIFAR10_SPEC",
    "MNIST_SPEC",
    "IMAGENET_SPEC",
    "LabeledImages",
    "BUILTIN_DATASETS",
    "PHOTO_NAMES",
    "load_builtin",
    "load_photos",
    "load_faces",
    "load_digits",
    "IMAGE_EXTENSIONS",
    "load_image_folder",
    "load_cifar",
    "load_mnist_idx",
    "read_idx",
    "load_dataset",
]
