"""``DataRequest``: which real images a run uses, named once (like :class:`~gradleak.models.ModelSpec`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..limits import LIMITS, short_repr

__all__ = ["DataRequest"]

MAX_IMAGES = LIMITS["images"].high


@dataclass(frozen=True)
class DataRequest:
    """``n`` images from ``start`` of a built-in set (``photos``, ``faces``, ``digits``) or a
    local path (image folder, CIFAR batches, MNIST idx), resized to ``size`` px (None: the
    set's own size)."""

    name: str | os.PathLike = "photos"
    n: int | None = 8                # None: every image of the set
    size: int | None = 32
    start: int = 0

    def __post_init__(self):
        if not isinstance(self.name, (str, os.PathLike)) or not str(self.name).strip():
            raise ConfigError(f"data must be a built-in name or a path, got {short_repr(self.name)}")
        if self.n is not None:
            LIMITS["images"].check(self.n, "n")
        LIMITS["start"].check(self.start)
        if self.size is not None:
            LIMITS["side"].check(self.size, "size")

    def load(self):
        """The :class:`~gradleak.data.LabeledImages`, exactly ``n`` of them from ``start``."""
        from . import load_dataset

        dataset = load_dataset(self.name, size=self.size, n=None if self.n is None else self.start + self.n)
        if self.n is None:
            return dataset.select(list(range(self.start, len(dataset)))) if self.start else dataset
        if self.start + self.n > len(dataset):
            raise ConfigError(f"start {self.start} with n {self.n} is outside the {len(dataset)} images of "
                              f"{str(self.name)!r}")
        return dataset.select(list(range(self.start, self.start + self.n))) if self.start else dataset

    def to_json(self) -> dict[str, Any]:
        return {"name": str(self.name), "n": self.n, "size": self.size, "start": self.start}
