"""The model zoo, by name, and helpers to rebuild a model an update came from.

Any ``nn.Module`` works with gradleak; the zoo gives names to the architectures of the
literature so the CLI and update files can refer to them. Each entry knows the training
loss that goes with it.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError, one_line
from ..limits import MAX_CLASSES, MAX_PARAMETERS, check_input_shape, check_int, check_seed, short_repr
from .exercise import TwoLayerNet
from .adapters import TORCHVISION_MODELS, swap_activations, torchvision_model
from .convnet import ConvNet
from .lenet import LeNet
from .mlp import MLP
from .resnet import cifar_resnet18, resnet20, resnet32
from .rgap import CNN6, FCN3
from ..names import is_factory, is_hf_folder

__all__ = [
    "MODELS", "ModelEntry", "build_model", "parameter_shapes", "model_info", "check_model_info", "check_description",
    "model_from_info", "load_weights",
]


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # (input_shape, num_classes, **kwargs) -> module
    loss: str
    description: str
    modality: str = "image"          # "text": input_shape is (sequence length,), inputs are token ids


def _parse_hidden(hidden: Any) -> tuple[int, ...]:
    """Widths from '256,128', 256 or [256, 128]: whole numbers only (1.5 is refused, not rounded)."""
    if isinstance(hidden, str):
        parts = [h.strip() for h in hidden.replace("x", ",").split(",") if h.strip()]
        if not all(h.lstrip("-").isdigit() and len(h) < 12 for h in parts):
            raise ConfigError(f"hidden must be comma-separated widths such as '256,128', got {short_repr(hidden)}")
        return tuple(int(h) for h in parts)
    values = [hidden] if isinstance(hidden, int) and not isinstance(hidden, bool) else hidden
    if not isinstance(values, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) for h in values):
        raise ConfigError(f"hidden must be widths such as '256,128' or [256, 128], got {short_repr(hidden)}")
    return tuple(values)


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


# torchvision's ImageNet weights files (the names its weights enums give; fetched by the user, never by us)
_WEIGHTS_FILES = {"resnet18": "resnet18-f37072fd.pth", "densenet121": "densenet121-a639ec97.pth",
                  "inception_v3": "inception_v3_google-0cc3c7bd.pth"}


def _torchvision_entry(name: str) -> ModelEntry:
    def build(shape, num_classes, activation="relu"):
        model = torchvision_model(name, num_classes, shape[0])
        return model if activation == "relu" else swap_activations(model, activation)

    return ModelEntry(build, "cross_entropy",
                      f"torchvision {name}, untrained, {299 if name == 'inception_v3' else 224} px inputs; option "
                      "activation=sigmoid swaps every ReLU (seed 004). ImageNet weights are never downloaded: fetch "
                      f"{_WEIGHTS_FILES[name]} from https://download.pytorch.org/models/ and pass --weights FILE "
                      "--num-classes 1000")


for _name in TORCHVISION_MODELS:
    MODELS[f"tv-{_name}"] = _torchvision_entry(_name)


def _text_entry(factory: str, loss: str, description: str) -> ModelEntry:
    def build(shape, num_classes, **options):
        from ..text import models as text_models

        return getattr(text_models, factory)(shape, num_classes, **options)

    return ModelEntry(build, loss, description, modality="text")


_TEXT_OPTIONS = ("options width=768, layers=12, heads=12, positions, vocab (default: the built-in tokenizer's), "
                 "dropout=0, lora_rank (LoRA adapters only), lora_alpha, lora_init=trained|peft")
MODELS["gpt2"] = _text_entry("gpt2", "causal_lm", "GPT-2 decoder language model (transformers, random init, "
                             "GPT-2 small sizes by default; tied embeddings, option tie); " + _TEXT_OPTIONS)
MODELS["gpt2-classifier"] = _text_entry("gpt2_classifier", "cross_entropy", "GPT-2 decoder with a classification "
                                        "head on the last token; " + _TEXT_OPTIONS)
MODELS["vit"] = ModelEntry(lambda shape, num_classes, **options: __import__(
    "gradleak.text.models", fromlist=["vit"]).vit(shape, num_classes, **options), "cross_entropy",
    "Vision Transformer (transformers' ViT, random init, learned position embeddings); options patch=4, width=128, "
    "layers=2, heads=4, dropout=0")
MODELS["bert"] = _text_entry("bert", "cross_entropy", "BERT encoder with a classification head (BERT-base sizes "
                             "by default); " + _TEXT_OPTIONS)


def _entry(name: Any) -> ModelEntry:
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"unknown model {short_repr(name)}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def _construct(name: str, shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """Call the zoo builder; every failure of a bad option becomes one ConfigError line."""
    try:
        return MODELS[name].build(shape, num_classes, **kwargs)
    except ConfigError as error:
        raise ConfigError(f"model {name!r}: {error}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError, KeyError) as error:
        raise ConfigError(f"model {name!r}: bad option {short_repr(kwargs, 120)} ({one_line(error, 200)}); "
                          f"{MODELS[name].description}") from None


def parameter_shapes(name: str, input_shape: tuple[int, ...], num_classes: int = 10, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a zoo model's parameters, found on PyTorch's ``meta`` device:
    nothing is allocated, so a description asking for 160 GB of weights is refused
    (more than MAX_PARAMETERS, or a shape with a zero or negative size) before any memory is used."""
    entry = _entry(name)
    shape = check_input_shape("input_shape", input_shape)
    if entry.modality == "text":
        if len(shape) != 1:
            raise ConfigError(f"text model {name!r}: input_shape must be (sequence length,), got {tuple(input_shape)}")
    elif len(shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    check_int("num_classes", num_classes, 1, MAX_CLASSES)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "initializing zero-element tensors is a no-op": refused below
        model = _construct(name, shape, num_classes, kwargs)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    empty = next((n for n, s in shapes.items() if math.prod(s) == 0), None)
    if empty is not None:
        zero_option = any(v == 0 or (isinstance(v, (list, tuple)) and 0 in v) for v in kwargs.values())
        if not zero_option:  # the options are fine: the input is too small for the model's downsampling
            raise ConfigError(f"model {name!r}: an input of {shape[1]}x{shape[2]} px is too small for it (its "
                              f"feature maps shrink to nothing before {empty.rpartition('.')[0] or empty!r}); give "
                              "larger images (--size 32) or a model for small inputs (mlp, lenet)")
        raise ConfigError(f"model {name!r} with options {short_repr(kwargs, 120)}: parameter {empty!r} has shape "
                          f"{shapes[empty]} (a width of zero?)")
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_PARAMETERS:
        raise ConfigError(f"model {name!r} with options {short_repr(kwargs, 120)} at input {shape} has {total:,} "
                          f"parameters, over the limit of {MAX_PARAMETERS:,}")
    return shapes


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """A zoo model with weights initialised deterministically from ``seed``.

    The options are checked first (:func:`parameter_shapes`, on the ``meta`` device), so a
    bad or oversized option is refused in one line before anything is allocated."""
    check_seed("seed", seed)
    parameter_shapes(name, input_shape, num_classes, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(name, tuple(input_shape), num_classes, kwargs)
    return model.to(dtype)


def model_info(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int, **kwargs: Any) -> dict[str, Any]:
    """The JSON description stored in update files so a model can be rebuilt."""
    return {"name": name, "input_shape": list(input_shape), "num_classes": num_classes, "seed": seed,
            "kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}


_INFO_KEYS = ("name", "input_shape", "num_classes", "seed", "kwargs", "weights_sha256")


def _check_option_value(key: str, value: Any, depth: int = 0) -> None:
    """Model options from a file are small JSON values: scalars, short strings, short lists of scalars."""
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 2**63):
        return
    if isinstance(value, str) and len(value) <= 200:
        return
    if isinstance(value, list) and len(value) <= 64 and depth == 0:
        for item in value:
            _check_option_value(key, item, depth + 1)
        return
    raise ConfigError(f"the update's model description: option {key!r} = {short_repr(value)} is not a small "
                      "JSON value (a number, a string of up to 200 characters, or a list of up to 64 of them)")


def check_model_info(info: Any) -> dict[str, Any]:
    """Validate an untrusted model description (from an update file) without building anything."""
    if not isinstance(info, Mapping):
        raise ConfigError(f"the update's model description must be a mapping, got {type(info).__name__}")
    unknown = sorted((str(k) for k in info if k not in _INFO_KEYS))
    if unknown:
        raise ConfigError(f"the update's model description has unknown key {unknown[0]!r} (keys: {', '.join(_INFO_KEYS)})")
    missing = [k for k in ("name", "input_shape", "num_classes") if k not in info]
    if missing:
        raise ConfigError(f"the update's model description is incomplete: no {missing[0]!r}")
    if not (isinstance(info["name"], str) and (is_factory(info["name"]) or is_hf_folder(info["name"]))):  # only named
        _entry(info["name"])
    digest = info.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ConfigError(f"the update's model description: weights_sha256 must be 64 hex digits, got {short_repr(digest)}")
    check_input_shape("model.input_shape", info["input_shape"])
    check_int("model.num_classes", info["num_classes"], 1, MAX_CLASSES)
    check_seed("model.seed", info.get("seed", 0))
    kwargs = info.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or len(kwargs) > 32 or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"the update's model description: kwargs must map up to 32 option names to values, "
                          f"got {short_repr(kwargs)}")
    for key, value in kwargs.items():
        _check_option_value(key, value)
    return {"name": info["name"], "input_shape": tuple(info["input_shape"]), "num_classes": info["num_classes"],
            "seed": info.get("seed", 0), "kwargs": dict(kwargs), "weights_sha256": digest}


def check_description(info: Any, expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Validate an untrusted model description and, with ``expected`` (the update's parameter
    names and shapes), check on the ``meta`` device that it builds exactly those parameters.
    Nothing is allocated and no code named by the description is imported. Returns the
    normalised description."""
    spec = check_model_info(info)
    if is_factory(spec["name"]) or is_hf_folder(spec["name"]):  # the user's: never imported or loaded because a file names it
        return spec
    shapes = parameter_shapes(spec["name"], spec["input_shape"], spec["num_classes"], **spec["kwargs"])
    if expected is not None:
        for name, shape in shapes.items():
            if name not in expected:
                raise ConfigError(f"the update's model description builds parameter {name!r}, which the update lacks")
            if tuple(expected[name]) != shape:
                raise ConfigError(f"the update's model description builds {name!r} with shape {shape}, but the "
                                  f"update's parameter has shape {tuple(expected[name])}")
        extra = next((n for n in expected if n not in shapes), None)
        if extra is not None:
            raise ConfigError(f"the update has parameter {extra!r}, which its model description does not build")
    return spec


def model_from_info(info: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                    expected: Mapping[str, tuple[int, ...]] | None = None) -> nn.Module:
    """Rebuild a zoo model from :func:`model_info` (weights are loaded separately).

    The description is untrusted (it comes from an update file): it is validated and the
    model's parameter shapes are worked out on the ``meta`` device first; with ``expected``
    (the update's parameter names and shapes) a model that does not match is refused
    before its weights are allocated."""
    spec = check_description(info, expected)
    return build_model(spec["name"], spec["input_shape"], spec["num_classes"], seed=spec["seed"], dtype=dtype,
                       **spec["kwargs"])


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``weights`` (keyed by parameter name) into ``model`` in place; return it."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise ConfigError(f"weights entry {name!r} is not a parameter of {type(model).__name__}")
            params[name].copy_(value.to(params[name].dtype))
    return model



