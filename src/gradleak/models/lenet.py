"""DLG's LeNet (Zhu et al. 2019, "Deep Leakage from Gradients").

Three 5x5 convolutions with 12 channels (strides 2, 2, 1, padding 2) and sigmoid
activations, then one fully connected classifier: 15,826 parameters for 3x32x32 inputs
and 10 classes. Sigmoid keeps the network twice differentiable everywhere, which DLG's
L-BFGS gradient matching needs. ``init="dlg"`` (the default) draws every weight and bias
uniformly from [-0.5, 0.5] as DLG's code does; ``init="default"`` keeps PyTorch's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .mlp import make_activation

__all__ = ["LeNet"]


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, activation: str = "sigmoid",
                 init: str = "dlg"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            make_activation(activation),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            make_activation(activation),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            make_activation(activation),
        )
        side = image_size
        for stride in (2, 2, 1):
            side = (side + 2 * 2 - 5) // stride + 1
        self.fc = nn.Linear(12 * side * side, num_classes)
        if init == "dlg":
            with torch.no_grad():
                for parameter in self.parameters():
                    parameter.uniform_(-0.5, 0.5)
        elif init != "default":
            raise ConfigError(f"LeNet init must be 'dlg' or 'default', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))
