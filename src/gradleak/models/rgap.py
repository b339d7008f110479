"""The networks of R-GAP (Zhu & Blaschko, arXiv 2010.07733): CNN6 (CIFAR) and FCN3 (MNIST).

Both follow the paper's assumptions: no bias anywhere, LeakyReLU (negative slope 0.2)
after every hidden layer, and a binary head (one logit, sigmoid/binary cross-entropy,
label known). ``num_classes > 2`` gives the general multi-class head (softmax
cross-entropy), still without bias, which R-GAP's last-layer step handles for three or
more classes (see :func:`gradleak.attacks.rgap.rgap_last_layer`).

- CNN6: six convolutions (3->12 k4 s2 p2, 12->36 k3 s2, 36->36 k3, 36->36 k3, 36->64 k3 s2,
  64->128 k3), then one linear layer (128*5*5 -> 1 at 32x32).
- FCN3: 784 -> 1000 -> 100 -> 1 (any input size: the first layer takes C*H*W).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CNN6", "FCN3"]


def _conv_side(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


class CNN6(nn.Module):
    """R-GAP's CNN6: six bias-free convolutions with LeakyReLU(0.2), one bias-free linear head."""

    SPECS = ((12, 4, 2, 2), (36, 3, 2, 1), (36, 3, 1, 1), (36, 3, 1, 1), (64, 3, 2, 1), (128, 3, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 1, image_size: int = 32, slope: float = 0.2,
                 widths: tuple[int, ...] | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        widths = widths or tuple(spec[0] for spec in self.SPECS)
        for width, (_, kernel, stride, padding) in zip(widths, self.SPECS):
            layers += [nn.Conv2d(channels, width, kernel, stride=stride, padding=padding, bias=False),
                       nn.LeakyReLU(slope)]
            channels, side = width, _conv_side(side, kernel, stride, padding)
        self.body = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * side * side, 1 if num_classes <= 2 else num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.body(x)))


class FCN3(nn.Module):
    """R-GAP's FCN3: in -> 1000 -> 100 -> 1, bias-free, LeakyReLU(0.2)."""

    def __init__(self, in_features: int = 784, num_classes: int = 1, hidden: tuple[int, int] = (1000, 100),
                 slope: float = 0.2):
        super().__init__()
        widths = [int(in_features), *[int(h) for h in hidden]]
        self.flatten = nn.Flatten()
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b, bias=False), nn.LeakyReLU(slope)]
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], 1 if num_classes <= 2 else num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.flatten(x)))


def fcn3_for(shape: tuple[int, ...], num_classes: int, **kwargs) -> FCN3:
    return FCN3(math.prod(shape), num_classes, **kwargs)
