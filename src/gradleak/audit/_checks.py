"""Checking an audit config's values: the untrusted-input half of :mod:`gradleak.audit.config`
(reading and parsing the file is :mod:`gradleak.audit._parse`).

A config is careless or hostile input. Everything here turns a bad value into one
:class:`~gradleak.errors.ConfigError` line that names the key and the failed condition,
before anything runs, is written or is allocated:

- the parsed values (:func:`check_tree`): plain strings, numbers, booleans, null, lists and
  mappings with string keys, integers within 64 bits, no NaN, nested at most
  :data:`MAX_DEPTH` deep, and at most :data:`MAX_NODES` values and :data:`MAX_CHARS`
  characters *counting every YAML alias where it is used*, so a "billion laughs" file is
  refused after a walk over its few distinct nodes, never expanded.

The field checks (:func:`count`, :func:`integer`, ...) share one message style:
``data.size: must be an integer in 4..512 or null, got 100000``.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import ConfigError, one_line
from ..limits import LIMITS, short_repr

MAX_NODES = 100_000          # values in the parsed config, every alias counted where it is used
MAX_CHARS = 1_000_000        # characters of text (keys and strings), aliases counted likewise
MAX_DEPTH = 32               # nesting of lists and mappings (an audit config needs about 6)
MAX_INT = 2**63              # integers must fit in a signed 64-bit value
MAX_IMAGES = LIMITS["images"].high  # data.n: images attacked
MAX_DATA_VALUES = 2**28      # data.n x 3 x size x size: 1 GiB of float32 pixels
MIN_SIDE, MAX_SIDE = LIMITS["side"].low, LIMITS["side"].high  # data.size, utility.size (the CLI's --size)
MAX_BATCH = LIMITS["batch"].high  # batch_sizes[k]: images per client
MAX_COUNT = 100_000          # utility rounds, clients, eval_every
MAX_GRID = 100_000           # models x attacks x defenses x batch sizes
MAX_NAME = 200               # characters of the audit's name
MAX_PATH = 4096              # characters of a data name or path

_CONTAINERS = (dict, list, tuple)
show = short_repr  # a short, one-line repr of a value for a message


def sorted_keys(keys) -> list[Any]:
    """Keys of any types in a stable order (by their repr): ``sorted`` would fail on ``1`` and ``'zz'``."""
    return sorted(keys, key=lambda k: (not isinstance(k, str), repr(k)))


# ------------------------------------------------------------------ the checks of field values
def integer(where: str, value: Any, low: int, high: int) -> int:
    """``value`` is an int (not a bool) in ``[low, high]``: ``where must be an integer in low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in {low}..{high}, got {show(value)}")
    return value


def count(where: str, value: Any, high: int) -> int:
    """``value`` is a positive int (not a bool) of at most ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigError(f"{where} must be a positive integer (at most {high}), got {show(value)}")
    return value


def side(where: str, value: Any) -> int | None:
    """An image side in pixels, or None (the data's own size)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not MIN_SIDE <= value <= MAX_SIDE):
        raise ConfigError(f"{where} must be an integer in {MIN_SIDE}..{MAX_SIDE} or null, got {show(value)}")
    return value


def number(where: str, value: Any, *, low: float = 0.0, low_open: bool = True, high: float = math.inf) -> float:
    """A finite number (not a bool) in the interval ``(low, high]`` (``[low, high]`` when not ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        try:
            value_f = float(value)
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(value_f) and (value_f > low if low_open else value_f >= low) and value_f <= high
    if not ok:
        bounds = f"> {low:g}" if low_open else f">= {low:g}"
        bounds += f" and <= {high:g}" if high != math.inf else ""
        raise ConfigError(f"{where} must be a finite number {bounds}, got {show(value)}")
    return float(value)


def text(where: str, value: Any, limit: int, *, one_line_only: bool = False) -> str:
    """A non-empty string of at most ``limit`` characters (and, if asked, without line breaks)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {show(value)}")
    if not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {show(value)}")
    if len(value) > limit:
        raise ConfigError(f"{where} must be at most {limit} characters, got {len(value):,}")
    if one_line_only and any(ch in "\n\r\x0b\x0c\x85\u2028\u2029" or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ConfigError(f"{where} must be one line, without line breaks or control characters, got {show(value)}")
    return value


def str_keyed(where: str, value: Any) -> dict[str, Any]:
    """A mapping whose keys are strings (options passed on as keyword arguments)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {show(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {show(bad[0])}")
    return dict(value)


def source(where: str, value: Any) -> str:
    """A data set: a built-in name or an existing path (checked now, not when the data is loaded)."""
    from ..data import BUILTIN_DATASETS

    text(where, value, MAX_PATH)
    if value in BUILTIN_DATASETS:
        return value
    try:
        exists = Path(value).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, an unknown ~user, a name too long
        exists = False
    if not exists:
        raise ConfigError(f"{where} must be a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}) or an "
                          f"existing path, got {show(value)}")
    return value


def check_data(data: Any) -> None:
    """``data``: {name: built-in name or path, n: images to attack, size: side in pixels or null}."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"data: expected a mapping with name, n, size, got {show(data)}")
    unknown = sorted_keys(k for k in data if k not in ("name", "n", "size"))
    if unknown:
        raise ConfigError(f"data: unknown key {show(unknown[0])} (expected name, n, size)")
    source("data.name:", data.get("name"))
    n = count("data.n: the number of images to attack", data.get("n"), MAX_IMAGES)
    size = side("data.size:", data.get("size"))
    if size is not None and n * 3 * size * size > MAX_DATA_VALUES:
        raise ConfigError(f"data: n={n} images of {size}x{size} are {n * 3 * size * size:,} values, over the limit "
                          f"of {MAX_DATA_VALUES:,} (1 GiB in float32)")


# ------------------------------------------------------------------ the parsed tree
def _join(path: str | None, key: Any) -> str:
    if isinstance(key, int):
        return f"{path or 'the audit config'}[{key}]"
    return key if path is None else f"{path}.{key}"


def _short(path: str | None) -> str:
    path = path or "the audit config"
    return path if len(path) <= 120 else path[:60] + "..." + path[-50:]


def _scalar(value: Any, path: str | None) -> int:
    """Check one scalar; return its characters of text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        if abs(value) >= MAX_INT:
            raise ConfigError(f"{_short(path)}: {show(value) if abs(value) >= 10**30 else value} is out of range "
                              "(integers must fit in 64 bits)")
        return 0
    if isinstance(value, float):
        if value != value:
            raise ConfigError(f"{_short(path)}: nan (not a number) is not a valid value")
        return 0
    raise ConfigError(f"{_short(path)}: a {type(value).__name__} is not a config value "
                      "(use a string, number, true/false, null, list or mapping)")


def _children(value: Any, path: str | None) -> list[tuple[Any, str]]:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"{_short(path)}: keys must be strings, got {show(key)}")
        return [(v, _join(path, k)) for k, v in value.items()]
    return [(v, _join(path, k)) for k, v in enumerate(value)]


def _totals(value: Any, path: str | None, memo: dict[int, tuple[int, int, int]]) -> tuple[int, int, int]:
    """(values, characters, depth) of a container whose children are all counted, aliases expanded."""
    nodes, chars, depth = 1, 0, 1
    if isinstance(value, dict):
        nodes += len(value)
        chars += sum(len(k) for k in value)
    for child, child_path in _children(value, path):
        if isinstance(child, _CONTAINERS):
            n, c, d = memo[id(child)]
        else:
            n, c, d = 1, _scalar(child, child_path), 0
        nodes, chars, depth = nodes + n, chars + c, max(depth, d + 1)
        if nodes > MAX_NODES:
            raise ConfigError(f"{_short(path)}: more than {MAX_NODES:,} values, counting every YAML alias where it "
                              "is used (an alias bomb?)")
        if chars > MAX_CHARS:
            raise ConfigError(f"{_short(path)}: more than {MAX_CHARS:,} characters of text, counting every YAML "
                              "alias where it is used")
    return nodes, chars, depth


def check_tree(root: Any, where: str | None = None) -> None:
    """Walk a parsed config once per distinct list or mapping and refuse what no audit needs.

    A YAML alias is the same Python object as its anchor, so sizes are memoised by identity:
    the walk visits each distinct node once, while the totals count a shared node every time it
    is referenced, exactly as the expanded document would. A node that contains itself (a
    recursive alias) is refused, and so is nesting deeper than :data:`MAX_DEPTH`."""
    if not isinstance(root, _CONTAINERS):
        _scalar(root, where)
        return
    memo: dict[int, tuple[int, int, int]] = {}
    active: set[int] = set()
    stack: list[tuple[Any, str | None, int, bool]] = [(root, where, 1, False)]
    while stack:
        value, path, level, done = stack.pop()
        key = id(value)
        if done:
            active.discard(key)
            memo[key] = _totals(value, path, memo)
            continue
        if key in memo:
            continue
        if level > MAX_DEPTH:
            raise ConfigError(f"{_short(path)}: nested more than {MAX_DEPTH} levels deep")
        active.add(key)
        stack.append((value, path, level, True))
        for child, child_path in _children(value, path):
            if not isinstance(child, _CONTAINERS):
                _scalar(child, child_path)
            elif id(child) in active:
                raise ConfigError(f"{_short(child_path)}: refers to itself (a recursive YAML alias)")
            elif id(child) in memo:
                if level + memo[id(child)][2] > MAX_DEPTH:
                    raise ConfigError(f"{_short(child_path)}: nested more than {MAX_DEPTH} levels deep")
            else:
                stack.append((child, child_path, level + 1, False))


# ------------------------------------------------------------------ shapes of entries
def named_entry(where: str, entry: Any, extra_keys: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, options, other allowed keys) from ``"name"`` or ``{name: ..., options: {...}, ...}``;
    the name normalised by :func:`gradleak.names.normalize`."""
    from ..names import normalize

    if isinstance(entry, str) and entry.strip():
        return normalize(entry, where), {}, {}
    if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        allowed = ("name", "options", *extra_keys)
        extra = sorted_keys(k for k in entry if k not in allowed)
        if extra:
            raise ConfigError(f"{where}: unknown key {show(extra[0])} (expected {', '.join(allowed)})")
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.options: expected a mapping, got {show(options)}")
        return normalize(entry["name"], f"{where}.name"), dict(options), {k: entry[k] for k in extra_keys if k in entry}
    raise ConfigError(f"{where}: expected a name or {{name: ..., options: {{...}}}}, got {show(entry)}")


@contextmanager
def named_errors(where: str) -> Iterator[None]:
    """Errors from building a model, attack or threat model, as one ConfigError line naming ``where``."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{where}: {one_line(error, 300)}") from None
    except (TypeError, ValueError, OverflowError) as error:  # an option of the wrong type or size
        raise ConfigError(f"{where}: invalid option ({one_line(error, 200)})") from None


def nonempty_list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw[key]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list, got {show(value)}")
    return value


def check_keys(where: str, value: Any, cls) -> None:
    """``value`` is a mapping whose keys are fields of the dataclass ``cls``; else name the first stranger."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {show(value)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted_keys(k for k in value if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {show(unknown[0])}; keys: {', '.join(sorted(known))}")
