"""``ModelSpec``: one way to name a model everywhere.

A spec is a zoo name (``"lenet"``) or the user's own factory (``"mypkg.nets:make_net"``,
called with the options as keyword arguments), its options, an optional weights file
(safetensors, or a PyTorch state dict read with ``weights_only=True``), the device, the
mode the client runs it in (``train``: BatchNorm normalises with the batch's statistics, as
a training client does; ``eval``: with the running statistics), the dtype and the seed of
the initialisation. The CLI and audit configs parse it once and pass it down; every
command builds its model from it with :meth:`ModelSpec.build`.

An update records where its model came from (:meth:`BuiltModel.description`): the zoo
name or factory, options, input shape, classes, seed and the SHA-256 of the weights file.
``gradleak attack update.safetensors`` rebuilds a zoo model from it; a factory is never
imported because a file names it: the user passes ``--model`` and gradleak checks that it
is the one recorded (:func:`check_recorded`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, one_line
from ..limits import MAX_CLASSES, check_int, check_seed, short_repr
from ..names import FACTORY_PATTERN, factory_parts, is_factory, is_hf_folder, model_name
from .weights import apply_weights, read_weights
from .zoo import MODELS, build_model

__all__ = ["ModelSpec", "BuiltModel", "resolve_device", "check_recorded", "MODES", "FACTORY_PATTERN"]

MODES = ("train", "eval")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def is_hf_name(name: Any) -> bool:
    """``hf:PATH``: a local ``save_pretrained`` folder (:func:`gradleak.text.models.hf_model`)."""
    return is_hf_folder(name)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else Apple's MPS when present, else the CPU.
    An explicit device that this machine lacks is one ConfigError line."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {short_repr(text)}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {text!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                              f"{built}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {text!r}: Apple's MPS is not available on this machine; use cpu or auto")
    elif resolved.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return resolved


@dataclass(frozen=True)
class BuiltModel:
    """A model built from a spec: the module (on its device, in its mode), its training loss,
    and the description an update records."""

    module: nn.Module
    loss: str
    spec: "ModelSpec"
    input_shape: tuple[int, ...]
    num_classes: int
    weights_sha256: str | None = None
    data_spec: Any = None   # the input normalization the weights were trained with, when their file says

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def description(self) -> dict[str, Any]:
        """What an update file records about its model (JSON): enough to rebuild a zoo model
        and to recognise a user's model (factory name and weights digest)."""
        out = {"name": self.spec.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
               "seed": self.spec.seed, "kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in self.spec.options.items()}}
        if self.weights_sha256 is not None:
            out["weights_sha256"] = self.weights_sha256
        return out


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: ``ModelSpec("lenet")``, ``ModelSpec("convnet", {"width": 16},
    weights="convnet.safetensors", device="cuda", mode="eval")`` or
    ``ModelSpec("mypkg.nets:make_net", {"depth": 4})``. ``num_classes`` overrides the data's
    class count (e.g. 1000 for ImageNet weights)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    weights: str | Path | None = None
    device: str = "auto"
    mode: str = "train"
    dtype: str = "float32"
    seed: int = 0
    num_classes: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "name", model_name(self.name, "model", MODELS))
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError(f"model options must map names to values, got {short_repr(self.options)}")
        object.__setattr__(self, "options", dict(self.options))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be 'train' (BatchNorm uses the batch's statistics, as a training client "
                              f"does) or 'eval' (running statistics), got {short_repr(self.mode)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, got {short_repr(self.dtype)}")
        if not isinstance(self.device, (str, torch.device)):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {short_repr(self.device)}")
        check_seed("seed", self.seed)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1, MAX_CLASSES)
        if self.weights is not None and not isinstance(self.weights, (str, Path)):
            raise ConfigError(f"weights must be a file path, got {short_repr(self.weights)}")

    # ------------------------------------------------------------------ views
    @property
    def is_factory(self) -> bool:
        return is_factory(self.name)

    @property
    def modality(self) -> str:
        """``image`` or ``text`` (the zoo's text models and ``hf:`` folders)."""
        if is_hf_name(self.name):
            return "text"
        return MODELS[self.name].modality if self.name in MODELS else "image"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        """``convnet(width=16)``: the name and its options, for tables."""
        options = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.name + (f"({options})" if options else "") + (" [eval]" if self.mode == "eval" else "")

    def with_(self, **changes: Any) -> "ModelSpec":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options), "weights": None if self.weights is None else
                str(self.weights), "device": str(self.device), "mode": self.mode, "dtype": self.dtype,
                "seed": self.seed, "num_classes": self.num_classes}

    # ------------------------------------------------------------------ building
    def build(self, input_shape: tuple[int, ...], num_classes: int | None = None) -> BuiltModel:
        """The model for inputs of ``input_shape`` (C, H, W) and ``num_classes`` classes (the
        spec's own ``num_classes`` wins): built on the CPU from the seed, weights loaded,
        cast, put in its mode and moved to its device. Every failure is one ConfigError line."""

        classes = self.num_classes or num_classes or 10
        device = resolve_device(self.device)
        hf_loss = None
        if is_hf_name(self.name):
            from ..text.models import hf_model

            module, hf_loss = hf_model(self.name[3:], classes)
        elif self.is_factory:
            module = _call_factory(self.name, self.options, self.seed, tuple(input_shape), classes)
        else:
            module = build_model(self.name, tuple(input_shape), classes, seed=self.seed, **self.options)
        module = module.to(self.torch_dtype)
        digest = data_spec = None
        if self.weights is not None:
            weights = read_weights(self.weights)
            apply_weights(module, weights)
            digest, data_spec = weights.sha256, weights.data_spec
        module.train(self.mode == "train")
        module = module.to(device)
        loss = hf_loss or (MODELS[self.name].loss if not self.is_factory else
                           _factory_loss(self.name, module, tuple(input_shape)))
        return BuiltModel(module, loss, self, tuple(input_shape), classes, digest, data_spec)

    @classmethod
    def from_description(cls, description: Mapping[str, Any], **overrides: Any) -> "ModelSpec":
        """The spec of a zoo model recorded in an update (weights come with the update)."""
        return cls(description["name"], dict(description.get("kwargs") or {}), seed=description.get("seed", 0),
                   **overrides)


def _raised(error: BaseException) -> str:
    """What the user's code did, in words: ``raised ValueError: ...`` or ``called sys.exit(0)``
    (a message that itself fails to print is named as such)."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({short_repr(error.code)})"
    try:
        message = one_line(error, 200)
    except BaseException:  # noqa: BLE001 - an exception whose __str__ raises
        message = "(its message cannot be printed)"
    return f"raised {type(error).__name__}: {message or '(no message)'}"


@contextmanager
def user_code(what: str):
    """Run the user's code (an import, a factory, a forward pass): anything it raises, sys.exit()
    and GeneratorExit included, becomes one ConfigError line starting with ``what``. Ctrl-C
    (KeyboardInterrupt) is not caught: it means stop."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except ConfigError:
        raise
    except BaseException as error:  # noqa: BLE001 - whatever the user's code does is reported, not propagated
        raise ConfigError(f"{what} {_raised(error)}") from None


FACTORY_CONTRACT = ("a factory is called as factory(**options) with your --model-option values, plus "
                    "input_shape=(C, H, W) and num_classes=K when its signature names them, and must return an "
                    "nn.Module whose forward maps a batch (B, C, H, W) to class scores (B, K)")


def _import_user_module(module_name: str):
    """Import the user's module the way ``python -m`` would: the current folder first on the path
    (a ``gradleak`` console script otherwise sees only its own folder and site-packages)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _factory_arguments(factory: Any, options: Mapping[str, Any], input_shape: tuple[int, ...],
                       classes: int) -> dict[str, Any]:
    """The options, plus ``input_shape`` and ``num_classes`` for a factory whose signature names
    them (and that the options do not already set)."""
    arguments = dict(options)
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: options only
        return arguments
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", classes)):
        if name in names and name not in arguments:
            arguments[name] = value
    return arguments


def _call_factory(spec: str, options: Mapping[str, Any], seed: int, input_shape: tuple[int, ...] = (),
                  classes: int = 10) -> nn.Module:
    """Import the user's module (named on the command line or in the user's own config) and
    call the factory (:data:`FACTORY_CONTRACT`); every failure is one line naming the spec."""
    module_name, attr = factory_parts(spec)
    try:
        module = _import_user_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - ImportError, SyntaxError, sys.exit() at import, anything
        hint = ""
        if isinstance(error, ModuleNotFoundError) and error.name == module_name.partition(".")[0]:
            hint = (f"; gradleak imports it as Python does, from the current folder ({os.getcwd()}), PYTHONPATH "
                    "and the installed packages: run from the folder that holds it, add that folder to PYTHONPATH, "
                    "or pip install -e your package")
        what = _raised(error).removeprefix("raised ")
        raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({what}){hint}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {module_name!r} has no callable {attr!r}")
    arguments = _factory_arguments(factory, options, input_shape, classes)
    with user_code(f"model {spec!r}: the factory"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**arguments)
        except TypeError as error:  # the options do not fit its signature: say what it is called with
            raise ConfigError(f"model {spec!r}: the factory raised TypeError: {one_line(error, 200)} "
                              f"({FACTORY_CONTRACT})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module "
                          f"({FACTORY_CONTRACT})")
    with user_code(f"model {spec!r}: listing the model's tensors"):
        parameters, buffers = list(model.parameters()), list(model.buffers())
    if not parameters:
        raise ConfigError(f"model {spec!r}: the model has no parameters (nothing is shared, nothing to attack)")
    odd = next((t for t in parameters + buffers if t.is_meta or t.layout != torch.strided
                or not (t.is_floating_point() or t.dtype in _INDEX)), None)
    if odd is not None:
        what = "on the meta device (shapes without values)" if odd.is_meta else f"{odd.layout} {odd.dtype}"
        raise ConfigError(f"model {spec!r}: the factory returned a model with tensors {what}; build it with real, "
                          "dense floating-point parameters on the CPU")
    if not all(bool(torch.isfinite(p).all()) for p in parameters if p.is_floating_point()):
        raise ConfigError(f"model {spec!r}: the factory returned a model with NaN or infinite parameters")
    return model


_INDEX = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)  # buffers such as counters


def model_outputs(spec: str, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The number of outputs of ``model`` for inputs of ``input_shape``: a probe forward pass on a
    batch of two, whose output must be (2, K) with K >= 1 (one row of K class scores per input)."""
    p = next(model.parameters())
    was_training = model.training
    try:
        with user_code(f"model {spec!r} does not accept an input of shape {tuple(input_shape)}: its forward"):
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros((2, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        with user_code(f"model {spec!r}: its train()"):
            model.train(was_training)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.ndim != 2 or out.shape[0] != 2 \
            or out.shape[1] < 1 or out.layout != torch.strided:
        got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else f"{out.dtype} of shape {tuple(out.shape)}"
        raise ConfigError(f"model {spec!r}: for a batch of 2 inputs of shape {tuple(input_shape)} the model must "
                          f"return class scores of shape (2, K) with K >= 1, got {got}")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"model {spec!r}: its class scores for a batch of zeros are NaN or infinite")
    return int(out.shape[1])


def _factory_loss(spec: str, model: nn.Module, input_shape: tuple[int, ...]) -> str:
    task = getattr(model, "task", None)   # a text model (gradleak.text.models): token ids in, no probe pass
    if task in ("causal-lm", "classification"):
        return "causal_lm" if task == "causal-lm" else "cross_entropy"
    return "binary_cross_entropy" if model_outputs(spec, model, input_shape) == 1 else "cross_entropy"


def check_recorded(recorded: Mapping[str, Any], built: BuiltModel, where: str) -> None:
    """Refuse a model that is not the one an update recorded: another zoo model or factory,
    other options, input shape or classes, or weights with another digest."""
    mine = built.description()
    for key in ("name", "input_shape", "num_classes", "kwargs"):
        theirs = recorded.get(key)
        if key == "kwargs":
            theirs = theirs or {}
        if theirs is not None and _json_equal(theirs, mine[key]) is False:
            raise ConfigError(f"{where}: the update was made with model {key} {short_repr(theirs)}, not "
                              f"{short_repr(mine[key])}")
    digest = recorded.get("weights_sha256")
    if digest is not None and built.weights_sha256 is not None and digest != built.weights_sha256:
        raise ConfigError(f"{where}: the update was made from weights with SHA-256 {digest[:12]}..., but "
                          f"{str(built.spec.weights)!r} has {built.weights_sha256[:12]}...")


def _json_equal(a: Any, b: Any) -> bool:
    import json

    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def parameter_count(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
