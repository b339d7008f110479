"""ResNets for CIFAR-sized inputs (He et al. 2016, "Deep Residual Learning").

- ``cifar_resnet18``: the ImageNet ResNet-18 layout (BasicBlock, [2, 2, 2, 2], 64-512
  channels) with a 3x3 stride-1 stem and no max-pooling, as used for 32x32 images
  (~11.2M parameters for 10 classes).
- ``resnet20`` / ``resnet32``: the CIFAR ResNets of He et al. §4.2: three stages of n = 3 / 5
  BasicBlocks with 16, 32, 64 channels (x ``width``), global average pooling and a linear
  classifier (0.27M / 0.46M parameters at width 1).
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import make_activation

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet18", "resnet20", "resnet32"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = make_activation(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: list[int], channels: list[int], in_channels: int = 3, num_classes: int = 10,
                 activation: str = "relu"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), make_activation(activation))
        stages = []
        c_in = channels[0]
        for i, (n, c_out) in enumerate(zip(blocks, channels)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, activation) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def cifar_resnet18(in_channels: int = 3, num_classes: int = 10, activation: str = "relu") -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes, activation)


def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 1, activation: str = "relu") -> CifarResNet:
    return CifarResNet([3, 3, 3], [16 * width, 32 * width, 64 * width], in_channels, num_classes, activation)


def resnet32(in_channels: int = 3, num_classes: int = 10, width: int = 1, activation: str = "relu") -> CifarResNet:
    return CifarResNet([5, 5, 5], [16 * width, 32 * width, 64 * width], in_channels, num_classes, activation)
