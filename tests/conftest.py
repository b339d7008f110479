"""Shared fixtures: real images from the packages (never noise), small and deterministic."""

from __future__ import annotations

import pytest
import torch

import gradleak  # noqa: F401  (applies the torchvision compatibility shim first)
from gradleak.data import load_builtin


@pytest.fixture(scope="session")
def photos():
    """The 10 built-in colour photos at 32x32 (float32, [0, 1]) with their labels 0..9."""
    return load_builtin("photos", size=32)


@pytest.fixture(scope="session")
def faces():
    """The LFW subset: 25x25 grayscale crops, label 1 = face, 0 = not a face."""
    return load_builtin("faces")


@pytest.fixture(scope="session")
def digits():
    return load_builtin("digits", n=64)


@pytest.fixture(autouse=True)
def _single_thread():
    """Keep torch at one thread: the 2-core CI machine slows down badly when oversubscribed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
