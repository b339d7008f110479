"""A restricted unpickler for data batches (CIFAR "python version" files are pickles).

Nothing a pickle names is ever called as is. :class:`RestrictedUnpickler` resolves a short
allow-list of globals to *checked stand-ins*:

- numpy array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
  ``_frombuffer``): only plain numeric dtypes (no object, string, structured or sub-array
  dtypes), and an array's claimed shape must match the bytes the pickle itself carries, so
  no array is ever larger than the file;
- builtin containers and scalars (``bytes``, ``bytearray`` ..., never with an int size) and
  ``_codecs.encode`` limited to latin-1 text (what protocol-2 pickles of bytes call).

It runs Python's own pure-Python unpickler loop (no recursion, reads bounded by the data in
memory), with the opcodes that hash keys (dict items, set items) accepting only scalar keys:
a deeply nested tuple used as a key would otherwise overflow the C stack when hashed.
``BUILD`` may only restore the stand-ins' state. The file is bounded by
:data:`MAX_PICKLE_BYTES` (1 GiB) before it is read; every failure is one DataError line.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import re
from typing import Any

import numpy as np

from ..errors import DataError, one_line
from ._files import quote, read_bounded

__all__ = ["MAX_PICKLE_BYTES", "RestrictedUnpickler", "safe_unpickle"]

MAX_PICKLE_BYTES = 2**30
_SCALARS = (str, bytes, int, float, bool, complex, type(None))
_DTYPE_NAME = re.compile(r"[?]|[biufc][1-9][0-6]?")
_MAX_NDIM = 32


class _Refused(pickle.UnpicklingError):
    """A well-formed pickle asked for something the data format never needs."""


class _NDArrayToken:
    """What ``numpy.ndarray`` resolves to: a marker accepted only as ``_reconstruct``'s first argument."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray may not be called (it would allocate the shape the pickle claims)")


_NDARRAY = _NDArrayToken()


class _DType:
    """A numeric dtype named by the pickle; its ``BUILD`` state may only set the byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if not isinstance(name, str) or not _DTYPE_NAME.fullmatch(name):
            shown = repr(name[:40]) if isinstance(name, str) else f"of type {type(name).__name__}"
            raise _Refused(f"dtype {shown} is not a plain numeric dtype")
        try:
            self.dtype = np.dtype(name)
        except TypeError:
            raise _Refused(f"dtype {name!r} is not a numpy dtype") from None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "="):
            raise _Refused("malformed dtype state")
        if any(part is not None for part in state[2:5]) or (len(state) == 9 and state[8]):
            raise _Refused("structured, sub-array or annotated dtypes are not data")
        self.dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


def _raw_bytes(raw: Any) -> bytes:
    if isinstance(raw, str):  # Python 2 pickles (the CIFAR archives) carry array bytes as latin-1 text
        try:
            return raw.encode("latin1")
        except UnicodeEncodeError:
            raise _Refused("array data text is not latin-1") from None
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    raise _Refused(f"array data must be bytes, got {type(raw).__name__}")


def _checked_array(shape: Any, dtype: Any, raw: Any, order: str = "C") -> tuple[tuple[int, ...], np.dtype, bytes]:
    """The shape, dtype and bytes of an array whose claimed size equals the bytes it carries."""
    if not isinstance(dtype, _DType):
        raise _Refused("array dtype is not a numpy dtype from the allow-list")
    if (not isinstance(shape, tuple) or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _Refused("array shape must be a tuple of at most 32 non-negative ints")
    data = _raw_bytes(raw)
    claimed = math.prod(shape) * dtype.dtype.itemsize
    if claimed != len(data):
        raise _Refused(f"array shape {shape} of {dtype.dtype} claims {claimed} bytes but the pickle carries "
                       f"{len(data)}")
    if order not in ("C", "F"):
        raise _Refused("array order must be 'C' or 'F'")
    return shape, dtype.dtype, data


class _SafeArray(np.ndarray):
    """What ``_reconstruct`` returns: an empty array whose ``BUILD`` state is checked first."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise _Refused("malformed array state")
        shape, dtype, fortran, raw = state[-4:]
        shape, real, data = _checked_array(shape, dtype, raw)
        np.ndarray.__setstate__(self, (1, shape, real, bool(fortran), data))


def _reconstruct(subtype: Any, shape: Any = (0,), code: Any = b"b") -> _SafeArray:
    if subtype is not _NDARRAY:
        raise _Refused("_reconstruct may only rebuild numpy.ndarray")
    return np.ndarray.__new__(_SafeArray, (0,), np.uint8)  # the claimed shape is ignored: BUILD sets it from data


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    shape, real, data = _checked_array(shape, dtype, buffer, order)
    return np.frombuffer(data, dtype=real).reshape(shape, order=order).copy(order="K")


def _scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, _DType):
        raise _Refused("numpy scalar dtype is not from the allow-list")
    data = _raw_bytes(raw)
    if len(data) != dtype.dtype.itemsize:
        raise _Refused(f"numpy scalar of {dtype.dtype} needs {dtype.dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """What protocol-2 pickles of ``bytes`` call (``_codecs.encode``), limited to latin-1."""
    if not isinstance(text, str) or not isinstance(encoding, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused("_codecs.encode is only allowed on text with the latin-1 codec")
    return text.encode("latin1")


def _check_keys(items: Any, what: str) -> None:
    for item in items:
        if not isinstance(item, _SCALARS):
            raise _Refused(f"{what} must be str, bytes or numbers, got {type(item).__name__}")


def _container(kind: type):
    def make(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict) if kind is dict else (list, tuple))):
            raise _Refused(f"{kind.__name__}() may only be called on a list or tuple")
        if kind in (set, frozenset) and args:
            _check_keys(args[0], "set elements")
        if kind is dict and args:
            pairs = list(args[0].items()) if isinstance(args[0], dict) else list(args[0])
            if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
                raise _Refused("dict() needs key-value pairs")
            _check_keys([k for k, _ in pairs], "dict keys")
            return dict(pairs)
        return kind(*args)

    return make


def _bytes_like(kind: type):
    def make(*args: Any) -> Any:
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return kind(args[0])
        if len(args) == 2 and isinstance(args[0], str):
            return kind(_latin1_encode(args[0], args[1]))
        raise _Refused(f"{kind.__name__}() may only copy bytes or latin-1 text (never an int size)")

    return make


def _scalar_type(kind: type):
    def make(*args: Any) -> Any:
        if len(args) > 1 or not all(isinstance(a, (str, int, float, bool)) for a in args):
            raise _Refused(f"{kind.__name__}() may only convert one scalar")
        return kind(*args)

    return make


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a data pickle may name, each mapped to a checked stand-in."""
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _DType,
                                           ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = _scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    for module in ("builtins", "__builtin__"):
        for kind in (dict, list, tuple, set, frozenset):
            allowed[(module, kind.__name__)] = _container(kind)
        for kind in (bytes, bytearray):
            allowed[(module, kind.__name__)] = _bytes_like(kind)
        for kind in (str, int, float, complex, bool):
            allowed[(module, kind.__name__)] = _scalar_type(kind)
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python loop, so that opcodes can be checked
    """An unpickler whose ``find_class`` resolves only numpy array reconstruction and
    builtin containers (as checked stand-ins); any other global (``os.system``,
    ``builtins.eval``, ...) is refused with a DataError before anything is called."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise DataError(
                f"{self._source}: refused to unpickle global {one_line(module, 80)}.{one_line(name, 80)} (a data "
                "batch may only hold numpy arrays and builtin containers; this file may be malicious)"
            ) from None

    def _load_build(self) -> None:
        if not isinstance(self.stack[-2] if len(self.stack) > 1 else None, (_SafeArray, _DType)):
            raise _Refused("BUILD may only restore numpy arrays and dtypes")
        pickle._Unpickler.load_build(self)

    def _load_setitem(self) -> None:
        _check_keys(self.stack[-2:-1], "dict keys")
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        _check_keys(items[0::2], "dict keys")
        target = self.stack[-1]
        if not isinstance(target, dict):
            raise _Refused("SETITEMS on something that is not a dict")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        _check_keys(items[0::2], "dict keys")
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def _load_additems(self) -> None:
        items = self.pop_mark()
        _check_keys(items, "set elements")
        target = self.stack[-1]
        if not isinstance(target, set):
            raise _Refused("ADDITEMS on something that is not a set")
        target.update(items)

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        _check_keys(items, "set elements")
        self.append(frozenset(items))

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset


def _plain(value: Any) -> Any:
    """A stand-in array as a plain ndarray (containers are left as they are)."""
    return value.view(np.ndarray) if isinstance(value, _SafeArray) else value


def safe_unpickle(path: str | os.PathLike, max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Read one pickle file (a regular file of at most ``max_bytes`` bytes) with
    :class:`RestrictedUnpickler`; top-level stand-in arrays become plain ndarrays."""
    data = read_bounded(path, "pickle file", max_bytes)
    try:
        value = RestrictedUnpickler(io.BytesIO(data), quote(path)).load()
    except DataError:
        raise
    except _Refused as error:
        raise DataError(f"{quote(path)}: refused to unpickle: {one_line(error)} (this file may be malicious)") from None
    except RecursionError:
        raise DataError(f"{quote(path)}: not a readable pickle (nested too deeply)") from None
    except Exception as error:  # noqa: BLE001 - truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"{quote(path)}: not a readable pickle ({type(error).__name__}: {one_line(error)})") from None
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return _plain(value)
