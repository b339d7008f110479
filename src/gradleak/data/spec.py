"""Normalization, handled once and explicitly.

Images travel through gradleak as float tensors in [0, 1], NCHW. What the model sees is
``spec.normalize(images)``; what metrics and pictures see is ``spec.denormalize(x)``.
The client applies the spec; the attacker is granted it (or not) through the
:class:`~gradleak.threat.ThreatModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..limits import short_repr

__all__ = ["DataSpec", "CIFAR10_SPEC", "MNIST_SPEC", "IMAGENET_SPEC"]


_MAX_CHANNELS = 4096


def _numbers(name: str, values: Any) -> tuple[float, ...]:
    """A tuple of finite floats (one per channel), or a ConfigError naming ``DataSpec.<name>``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) > _MAX_CHANNELS:
        raise ConfigError(f"DataSpec.{name}: expected a list of up to {_MAX_CHANNELS} numbers (one per channel), "
                          f"got {type(values).__name__}")
    out = []
    for k, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"DataSpec.{name}[{k}]: expected a number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"DataSpec.{name}[{k}]: must be finite, got {'an integer beyond float range' if isinstance(value, int) else value}")
        out.append(number)
    return tuple(out)


@dataclass(frozen=True)
class DataSpec:
    """Per-channel mean and std of the client's input normalization ``(x - mean) / std``."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        mean, std = _numbers("mean", self.mean), _numbers("std", self.std)
        if len(mean) != len(std):
            raise ConfigError(f"DataSpec: mean has {len(mean)} channels but std has {len(std)}")
        if not mean:
            raise ConfigError("DataSpec: mean and std need at least one channel")
        if any(not (s > 0) for s in std):
            raise ConfigError(f"DataSpec: every std must be > 0, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def identity(cls, channels: int = 1) -> "DataSpec":
        return cls((0.0,) * channels, (1.0,) * channels)

    @classmethod
    def from_images(cls, images: torch.Tensor) -> "DataSpec":
        """The per-channel mean and std of a batch of [0, 1] images (NCHW)."""
        if images.ndim != 4:
            raise ConfigError(f"DataSpec.from_images: images must be NCHW, got shape {tuple(images.shape)}")
        flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
        std = flat.std(dim=1).clamp_min(1e-6)
        return cls(tuple(flat.mean(dim=1).tolist()), tuple(std.tolist()))

    @property
    def is_identity(self) -> bool:
        return all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4:
            raise ConfigError(f"DataSpec: expected NCHW images, got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if len(self.mean) not in (1, channels):
            raise ConfigError(
                f"DataSpec has {len(self.mean)} channels but the images have {channels} (shape {tuple(x.shape)})"
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> what the model sees."""
        if self.is_identity:
            return images
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """What the model sees -> images on the [0, 1] scale (not clamped)."""
        if self.is_identity:
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, value: dict[str, Sequence[float]] | None) -> "DataSpec":
        if value is None:
            return cls()
        if not isinstance(value, dict) or set(value) != {"mean", "std"}:
            raise ConfigError(f"DataSpec: expected {{'mean': [...], 'std': [...]}}, got {short_repr(value)}")
        return cls(value["mean"], value["std"])


CIFAR10_SPEC = DataSpec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
MNIST_SPEC = DataSpec((0.1307,), (0.3081,))
IMAGENET_SPEC = DataSpec((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
