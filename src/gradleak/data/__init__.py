"""Real images: built-in samples that ship inside packages, and local data sets from a path."""

from .spec import CIFAR10_SPEC, IMAGENET_SPEC, MNIST_SPEC, DataSpec

__all__ = ["DataSpec", "CIFAR10_SPEC", "MNIST_SPEC", "IMAGENET_SPEC"]
