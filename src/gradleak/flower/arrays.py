"""Flower ``ArrayRecord`` s as gradleak tensors, and a client's reply as a :class:`SharedUpdate`.

A Flower train reply carries the client's full local ``state_dict`` (parameters and
buffers, keyed by name) in one ``ArrayRecord``; the round's global arrays are what the
strategy sent. The update a server can attack is the delta ``local - global`` of every
*parameter* (told apart from buffers by the model's ``named_parameters``), with the
global parameters as the weights at the round and the client's own buffers (its
BatchNorm running statistics after training).

Arrays come from untrusted clients: names, declared shapes and dtypes are checked against
the model before a byte is decoded, and the decoded array is checked again (its own header
may disagree with the declared shape). Every refusal is one :class:`ConfigError` line.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from ..data.spec import DataSpec
from ..errors import ConfigError
from ..limits import MAX_BATCH, short_repr
from ..models.spec import BuiltModel
from ..update import SharedUpdate
from .contract import ClientProtocol

__all__ = ["state_shapes", "record_tensors", "reply_arrays", "delta_update", "arrays_from_tensors"]


def state_shapes(built: BuiltModel) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(parameters, buffers)``: name -> shape of the model's state, as its ``state_dict`` names them."""
    params = {n: tuple(p.shape) for n, p in built.module.named_parameters()}
    buffers = {n: tuple(b.shape) for n, b in built.module.named_buffers() if n not in params}
    return params, buffers


def reply_arrays(content: Any, where: str) -> Any:
    """The one ``ArrayRecord`` in a message's content (Flower's strategies expect exactly one)."""
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ConfigError(f"{where}: expected exactly one ArrayRecord, found {len(records)}")
    return records[0]


def record_tensors(record: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: str, *,
                   floating: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The arrays of ``record`` named in ``expected`` as CPU tensors, each checked for its shape
    (declared and decoded) and dtype (floating point for the names in ``floating``).
    Names in ``expected`` that the record lacks are left out; the caller decides."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if name not in record:
            continue
        array = record[name]
        declared = tuple(getattr(array, "shape", ()) or ())
        if declared != tuple(shape):
            raise ConfigError(f"{where}[{name!r}]: shape {short_repr(declared)} != the model's {tuple(shape)}")
        try:
            value = array.numpy()
        except Exception as error:  # noqa: BLE001 - bytes from a client: refuse in one line whatever numpy says
            raise ConfigError(f"{where}[{name!r}]: cannot decode the array ({type(error).__name__})") from None
        if not isinstance(value, np.ndarray) or tuple(value.shape) != tuple(shape):
            raise ConfigError(f"{where}[{name!r}]: decoded shape {short_repr(getattr(value, 'shape', None))} != "
                              f"{tuple(shape)}")
        wants_float = floating is not None and name in floating
        if value.dtype.kind not in ("f", "i", "u", "b") or (wants_float and value.dtype.kind != "f"):
            raise ConfigError(f"{where}[{name!r}]: dtype {value.dtype} is not "
                              f"{'floating point' if wants_float else 'a number type'}")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if wants_float and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{where}[{name!r}]: {int((~torch.isfinite(tensor)).sum())} values are NaN or infinite")
        out[name] = tensor
    return out


def delta_update(global_tensors: Mapping[str, torch.Tensor], local_tensors: Mapping[str, torch.Tensor],
                 built: BuiltModel, protocol: ClientProtocol, *, data_spec: DataSpec | None = None,
                 extra: Mapping[str, Any] | None = None) -> SharedUpdate:
    """The :class:`SharedUpdate` a server sees from one reply: ``local - global`` per parameter
    (in the parameter's dtype, as the client's own arithmetic would give it), the global
    parameters as the weights at the round, the client's buffers, and the protocol's local
    training metadata. Every parameter of the model must be shared (else a ConfigError
    naming the first missing one). Unknown local steps are recorded as 1 only in the
    update's object; ``extra["flower"]["protocol"]`` keeps what was actually known."""
    params, buffer_shapes = state_shapes(built)
    missing = [n for n in params if n not in local_tensors or n not in global_tensors]
    if missing:
        raise ConfigError(f"the reply shares {len(params) - len(missing)} of {len(params)} parameters of the model "
                          f"(missing {missing[0]!r}): the server does not know the client's whole model")
    dtype = built.dtype
    weights = {n: global_tensors[n].to(dtype) for n in params}
    delta = {n: local_tensors[n].to(dtype) - weights[n] for n in params}
    buffers = {n: local_tensors[n] for n in buffer_shapes if n in local_tensors} or None
    n = protocol.num_examples
    batch = n if n is not None and n <= MAX_BATCH else None
    local_batch = protocol.batch_size if protocol.batch_size is not None and protocol.batch_size <= MAX_BATCH else None
    return SharedUpdate(
        tensors=delta, kind="delta", batch_size=batch, local_steps=protocol.local_steps or 1,
        local_lr=protocol.lr, local_epochs=protocol.epochs, local_batch_size=local_batch, loss=built.loss,
        weights=weights, buffers=buffers, parameters=params, input_shape=tuple(built.input_shape),
        data_spec=data_spec, model=built.description(), mode=protocol.mode or built.spec.mode,
        extra={"flower": {"protocol": protocol.to_json(), **dict(extra or {})}, **_text_extra(built)})


def _text_extra(built: BuiltModel) -> dict[str, Any]:
    """A text model's update says what its inputs are (as a text client's does; never the tokens), so a
    captured file is attacked as text by ``gradleak attack``."""
    from ..text.models import text_task

    task = text_task(built.module)
    if task is None:
        return {}
    vocab = int(built.module.net.config.vocab_size)
    return {"text": {"length": int(built.input_shape[0]), "vocab_size": vocab, "tokenizer_sha256": None, "task": task}}


def arrays_from_tensors(template: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """A new Flower ``ArrayRecord`` with ``template``'s keys in its order: the tensors given,
    cast to each template array's dtype, and ``template``'s own arrays for the other keys."""
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for name, array in template.items():
        if name in tensors:
            original = array.numpy()
            value = tensors[name].detach().cpu().numpy().astype(original.dtype, copy=False)
            if value.shape != original.shape:
                raise ConfigError(f"arrays_from_tensors[{name!r}]: shape {value.shape} != {original.shape}")
            record[name] = Array(np.ascontiguousarray(value))
        else:
            record[name] = array
    return record


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
