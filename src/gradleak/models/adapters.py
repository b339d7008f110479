"""torchvision's ImageNet architectures, and swapping activations (seed 004).

Seed 004 (a study of DLG on LeNet, ResNet-18, DenseNet-121 and Inception-v3) replaces
every ReLU by a Sigmoid so that the networks are twice differentiable with non-vanishing
second derivatives, which DLG's L-BFGS gradient matching needs. torchvision calls ReLU
both as modules and as functions (``F.relu`` inside DenseNet and Inception blocks), so
:func:`swap_activations` rewrites the traced graph (``torch.fx``) as well as the modules;
parameter names are kept, so gradients stay keyed like the original model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ConfigError
from .mlp import ACTIVATIONS

__all__ = ["torchvision_model", "swap_activations", "TORCHVISION_MODELS"]

TORCHVISION_MODELS = ("resnet18", "densenet121", "inception_v3")
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_FUNCTIONAL = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu}


def torchvision_model(name: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """An untrained torchvision model (no weights are downloaded)."""
    import torchvision.models as tvm

    if name not in TORCHVISION_MODELS:
        raise ConfigError(f"unknown torchvision model {name!r}; choose one of {TORCHVISION_MODELS}")
    if in_channels != 3:
        raise ConfigError(f"torchvision's {name} takes 3 input channels, got {in_channels}")
    if name == "inception_v3":
        return tvm.inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    return getattr(tvm, name)(weights=None, num_classes=num_classes)


def swap_activations(model: nn.Module, activation: str = "sigmoid", *, beta: float = 1.0,
                     require_relu: bool = False) -> nn.Module:
    """Return a copy of ``model`` with every ReLU (module or function) replaced.

    ``activation``: ``sigmoid``, ``tanh``, ``relu`` or ``softplus`` (``log(1 + exp(beta z)) / beta``,
    which tends to ReLU as ``beta`` grows). The result is a ``torch.fx.GraphModule`` with the
    same parameter names; the parameters and buffers are the model's own (shared, not copied).
    A model that ``torch.fx`` cannot trace is refused naming the condition; so is one without any
    ReLU when ``require_relu``.
    """
    if activation not in _FUNCTIONAL and activation != "softplus":
        raise ConfigError(f"cannot swap ReLU for {activation!r}; choose one of {sorted([*_FUNCTIONAL, 'softplus'])}")
    if activation == "softplus" and not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ConfigError(f"softplus beta must be a positive finite number, got {beta!r}")
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:   # fx refuses data-dependent control flow and untraceable calls
        raise ConfigError(f"swapping activations needs a model torch.fx can trace; {type(model).__name__} cannot: "
                          f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if activation == "softplus":   # the function, its keyword arguments and the module that replace a ReLU
        function, kwargs, module = F.softplus, {"beta": float(beta)}, lambda: nn.Softplus(beta=float(beta))
    else:
        function, kwargs, module = _FUNCTIONAL[activation], {}, ACTIVATIONS[activation]
    swapped = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
            node.target, node.kwargs, node.args = function, dict(kwargs), node.args[:1]
            swapped += 1
        elif node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.ReLU):
            parent, _, child = node.target.rpartition(".")
            setattr(graph_module.get_submodule(parent) if parent else graph_module, child, module())
            swapped += 1
    if require_relu and not swapped:
        raise ConfigError(f"{type(model).__name__} has no ReLU (module or F.relu call) to swap for {activation}")
    graph_module.recompile()
    graph_module.train(model.training)
    return graph_module
