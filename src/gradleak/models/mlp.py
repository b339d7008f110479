"""Fully connected networks of any depth and width."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``Flatten -> [Linear -> activation] * len(hidden) -> Linear(num_classes)``.

    Layers are named ``fc1 ... fcL`` (the classifier is the last), so gradients are keyed
    ``fc1.weight``, ``fc1.bias``, ...
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128), num_classes: int = 10,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        widths = [int(in_features), *[int(h) for h in hidden], int(num_classes)]
        if any(w < 1 for w in widths):
            raise ConfigError(f"MLP widths must be positive, got in_features={in_features}, hidden={list(hidden)}, "
                              f"num_classes={num_classes}")
        self.flatten = nn.Flatten()
        self.layers = nn.ModuleDict()
        self._activations = nn.ModuleList()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.layers[f"fc{i}"] = nn.Linear(a, b, bias=bias)
        for _ in hidden:
            self._activations.append(make_activation(activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        layers = list(self.layers.values())
        for layer, activation in zip(layers[:-1], self._activations):
            x = activation(layer(x))
        return layers[-1](x)
