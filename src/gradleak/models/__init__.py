"""The model zoo, by name, and helpers to rebuild a model an update came from.

Any ``nn.Module`` works with gradleak; the zoo gives names to the architectures of the
literature so the CLI and update files can refer to them. Each entry knows the training
loss that goes with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .exercise import TwoLayerNet, exercise_gradients
from .adapters import TORCHVISION_MODELS, swap_activations, torchvision_model
from .convnet import ConvNet
from .lenet import LeNet
from .mlp import ACTIVATIONS, MLP
from .resnet import CifarResNet, cifar_resnet18, resnet20, resnet32
from .rgap import CNN6, FCN3

__all__ = [
    "MODELS", "ModelEntry", "build_model", "model_info", "model_from_info", "load_weights",
    "TwoLayerNet", "exercise_gradients", "MLP", "LeNet", "ConvNet", "CifarResNet", "ACTIVATIONS",
    "cifar_resnet18", "resnet20", "resnet32", "torchvision_model", "swap_activations", "TORCHVISION_MODELS",
    "CNN6", "FCN3",
]


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # (input_shape, num_classes, **kwargs) -> module
    loss: str
    description: str


def _parse_hidden(hidden: Any) -> tuple[int, ...]:
    if isinstance(hidden, str):
        try:
            return tuple(int(h) for h in hidden.replace("x", ",").split(",") if h.strip())
        except ValueError:
            raise ConfigError(f"hidden must be comma-separated widths such as '256,128', got {hidden!r}") from None
    if isinstance(hidden, int):
        return (hidden,)
    return tuple(int(h) for h in hidden)


MODELS: dict[str, ModelEntry] = {
    "two-layer": ModelEntry(
        lambda shape, num_classes, hidden=64: TwoLayerNet(math.prod(shape), int(hidden)),
        "binary_cross_entropy",
        "the exercise's network (seed 000): Linear-ReLU-Linear, one sigmoid output, BCE; option hidden=m",
    ),
    "mlp": ModelEntry(
        lambda shape, num_classes, hidden=(256, 128), activation="relu", bias=True: MLP(
            math.prod(shape), _parse_hidden(hidden), num_classes, activation, bias in (True, "true", "1", 1)),
        "cross_entropy",
        "fully connected network; options hidden='256,128', activation=relu|sigmoid|tanh|leaky_relu, bias",
    ),
    "lenet": ModelEntry(
        lambda shape, num_classes, activation="sigmoid", init="dlg": LeNet(shape[0], num_classes, shape[-1], activation, init),
        "cross_entropy",
        "DLG's LeNet: 3 conv (12 ch, 5x5) + sigmoid + 1 FC; 15,826 parameters at 3x32x32, 10 classes",
    ),
    "convnet": ModelEntry(
        lambda shape, num_classes, width=32, activation="relu", batch_norm=True: ConvNet(
            shape[0], num_classes, int(width), shape[-1], activation, batch_norm in (True, "true", "1", 1)),
        "cross_entropy",
        "8 conv layers with BatchNorm, 2 max-pools, 1 FC; options width=32, activation, batch_norm",
    ),
    "resnet18": ModelEntry(
        lambda shape, num_classes, activation="relu": cifar_resnet18(shape[0], num_classes, activation),
        "cross_entropy",
        "ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), 11.2M parameters; option activation",
    ),
    "resnet20": ModelEntry(
        lambda shape, num_classes, width=1, activation="relu": resnet20(shape[0], num_classes, int(width), activation),
        "cross_entropy",
        "CIFAR ResNet-20 (He et al. 2016), 0.27M parameters at width 1; options width, activation",
    ),
    "resnet32": ModelEntry(
        lambda shape, num_classes, width=1, activation="relu": resnet32(shape[0], num_classes, int(width), activation),
        "cross_entropy",
        "CIFAR ResNet-32 (He et al. 2016), 0.46M parameters at width 1; options width, activation",
    ),
    "cnn6": ModelEntry(
        lambda shape, num_classes, slope=0.2: CNN6(shape[0], 1, shape[-1], float(slope)),
        "binary_cross_entropy",
        "R-GAP's CNN6: 6 bias-free conv + LeakyReLU(0.2), one bias-free logit (binary head, 0/1 labels)",
    ),
    "fcn3": ModelEntry(
        lambda shape, num_classes, slope=0.2: FCN3(math.prod(shape), 1, slope=float(slope)),
        "binary_cross_entropy",
        "R-GAP's FCN3: in-1000-100-1, bias-free, LeakyReLU(0.2), binary head (0/1 labels)",
    ),
}


def _torchvision_entry(name: str) -> ModelEntry:
    def build(shape, num_classes, activation="relu"):
        model = torchvision_model(name, num_classes, shape[0])
        return model if activation == "relu" else swap_activations(model, activation)

    return ModelEntry(build, "cross_entropy",
                      f"torchvision {name}, untrained, {299 if name == 'inception_v3' else 224} px inputs; option "
                      "activation=sigmoid swaps every ReLU (seed 004)")


for _name in TORCHVISION_MODELS:
    MODELS[f"tv-{_name}"] = _torchvision_entry(_name)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """A zoo model with weights initialised deterministically from ``seed``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if len(input_shape) != 3 or any(d < 1 for d in input_shape):
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = MODELS[name].build(tuple(input_shape), num_classes, **kwargs)
        except TypeError as error:
            raise ConfigError(f"model {name!r}: bad option ({error}); {MODELS[name].description}") from None
    return model.to(dtype)


def model_info(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, **kwargs: Any) -> dict[str, Any]:
    """The JSON description stored in update files so a model can be rebuilt."""
    return {"name": name, "input_shape": list(input_shape), "num_classes": num_classes, "seed": seed,
            "kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}


def model_from_info(info: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a zoo model from :func:`model_info` (weights are loaded separately)."""
    try:
        return build_model(info["name"], tuple(info["input_shape"]), int(info["num_classes"]),
                           seed=int(info.get("seed", 0)), dtype=dtype, **dict(info.get("kwargs", {})))
    except (KeyError, TypeError) as error:
        raise ConfigError(f"the update's model description {dict(info)!r} is incomplete ({error})") from None


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``weights`` (keyed by parameter name) into ``model`` in place; return it."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise ConfigError(f"weights entry {name!r} is not a parameter of {type(model).__name__}")
            params[name].copy_(value.to(params[name].dtype))
    return model



