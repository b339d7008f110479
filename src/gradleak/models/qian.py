"""The small CNN of Qian et al.'s condition (arXiv 2010.15718): one convolution, then a fully
connected layer with bias.

``QianConvHead(kernels, stride)``: conv(3 -> kernels, 3x3, stride, padding 1) + LeakyReLU(0.2),
then FC with bias (-> 32), ReLU, FC (-> 10). The FC layer's input is recoverable in closed
form; the convolution is invertible when ``kernels >= (d/d')^2 * C`` (d input width, d' output
width, C = 3 input channels): ``QianConvHead(4, 1)`` meets it (4 >= 3), ``QianConvHead(8, 2)``
does not (8 < 12). Used by the tests and the analyser grid to put CNNs on both sides.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QianConvHead"]


class QianConvHead(nn.Module):
    def __init__(self, kernels: int, stride: int, side: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, kernels, 3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(kernels * (side // stride) ** 2, 32)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.flatten(self.act(self.conv(x)))))
