"""A plain convolutional network of configurable width (the "ConvNet" of gradient
inversion benchmarks, e.g. Geiping et al. 2020 and the breaching framework's examples).

Eight 3x3 convolutions with BatchNorm and an activation, two 3x3 max-poolings, and one
linear classifier. ``width=32`` gives ~1.4M parameters at 3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import make_activation

__all__ = ["ConvNet"]


def _block(c_in: int, c_out: int, activation: str, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(make_activation(activation))
    return layers


class ConvNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, image_size: int = 32,
                 activation: str = "relu", batch_norm: bool = True):
        super().__init__()
        w = int(width)
        plan = [(in_channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), "pool",
                (4 * w, 4 * w), (4 * w, 4 * w), "pool", (4 * w, 4 * w), (4 * w, 4 * w)]
        layers: list[nn.Module] = []
        side = image_size
        for step in plan:
            if step == "pool":
                layers.append(nn.MaxPool2d(3))
                side //= 3
            else:
                layers.extend(_block(*step, activation, batch_norm))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))
