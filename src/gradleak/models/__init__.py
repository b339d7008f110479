"""Models: the zoo by name (:mod:`.zoo`), a model as a user names it (:mod:`.spec`), weights files.

Any ``nn.Module`` works with gradleak; the zoo gives names to the architectures of the
literature so the CLI and update files can refer to them. Each entry knows the training
loss that goes with it.
"""

from __future__ import annotations

from .adapters import TORCHVISION_MODELS, swap_activations, torchvision_model
from .convnet import ConvNet
from .exercise import TwoLayerNet, exercise_gradients
from .lenet import LeNet
from .mlp import ACTIVATIONS, MLP
from .resnet import CifarResNet, cifar_resnet18, resnet20, resnet32
from .rgap import CNN6, FCN3
from .spec import FACTORY_PATTERN, MODES, BuiltModel, ModelSpec, check_recorded, resolve_device
from .weights import apply_weights, read_weights
from .zoo import (MODELS, ModelEntry, build_model, check_description, check_model_info, load_weights, model_from_info,
                  model_info, parameter_shapes)

__all__ = [
    "MODELS", "ModelEntry", "build_model", "parameter_shapes", "model_info", "check_model_info", "check_description",
    "model_from_info",
    "load_weights",
    "TwoLayerNet", "exercise_gradients", "MLP", "LeNet", "ConvNet", "CifarResNet", "ACTIVATIONS",
    "cifar_resnet18", "resnet20", "resnet32", "torchvision_model", "swap_activations", "TORCHVISION_MODELS",
    "CNN6", "FCN3", "ModelSpec", "BuiltModel", "resolve_device", "check_recorded", "MODES", "FACTORY_PATTERN", "read_weights",
    "apply_weights",
]
