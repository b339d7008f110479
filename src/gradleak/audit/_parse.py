"""Reading and parsing an audit config file, which is untrusted: one ConfigError line for every problem.

- the file: a regular file (a FIFO or a device is never opened for reading), at most
  :data:`MAX_FILE_BYTES`, UTF-8 (a bad byte is named with its offset and line);
- the parse: YAML through a safe loader (no tag builds a Python object; duplicate keys are
  refused; libyaml, when present, caps nesting at 1000) or TOML; a syntax error becomes
  ``line L, column C: problem``.

What the parsed document may hold is :func:`gradleak.audit._checks.check_tree`'s business.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import ConfigError, one_line
from ._checks import show

MAX_FILE_BYTES = 1 << 20     # a config file: 1 MiB (the examples are under 2 KiB)


# ------------------------------------------------------------------ the file
def read_config(path: Path) -> str:
    """The text of a config file: a regular file of at most 1 MiB, UTF-8. Never blocks on a FIFO."""
    name = repr(str(path))
    try:
        is_file = path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        raise ConfigError(f"audit config {name} does not exist or is not a file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ConfigError(f"audit config {name} cannot be read: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"audit config {name} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"audit config {name} is {info.st_size:,} bytes; the limit is 1 MiB ({MAX_FILE_BYTES:,})")
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"audit config {name} is over the limit of 1 MiB ({MAX_FILE_BYTES:,} bytes)")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"audit config {name} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset "
                          f"{error.start} (line {line}) cannot be decoded") from None


# ------------------------------------------------------------------ parsing
_TOML_WHERE = re.compile(r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|(?P<end>end of document))\)$")


def _toml_message(error: Exception) -> str:
    """TOMLDecodeError as ``line L, column C: problem`` (3.14 has attributes, 3.11 a suffix)."""
    msg, line, col = getattr(error, "msg", None), getattr(error, "lineno", None), getattr(error, "colno", None)
    if isinstance(msg, str) and line is not None:
        return f"line {line}, column {col}: {msg}"
    match = _TOML_WHERE.match(one_line(error))
    if match is None:
        return one_line(error, 300)
    where = "end of file" if match["end"] else f"line {match['line']}, column {match['col']}"
    return f"{where}: {match['msg']}"


def _yaml_message(error: Exception, source: str) -> str:
    """A YAMLError as ``line L, column C: problem (context)``."""
    import yaml

    if isinstance(error, yaml.reader.ReaderError):
        position = min(max(int(error.position), 0), len(source))
        line = source.count("\n", 0, position) + 1
        column = position - (source.rfind("\n", 0, position) + 1) + 1
        character = ord(error.character) if isinstance(error.character, str) else error.character
        return f"line {line}, column {column}: unacceptable character #x{character:04x}: {error.reason}"
    if isinstance(error, yaml.MarkedYAMLError) and (error.problem or error.context):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = error.problem or error.context
        context = f" ({error.context})" if error.problem and error.context else ""
        return one_line(f"{where}{problem}{context}", 300)
    return one_line(error, 300)


def _yaml_loader():
    """A safe YAML loader (libyaml's when present: it also caps nesting at 1000) that refuses
    duplicate keys and integers too long for Python instead of raising a bare ValueError."""
    import yaml
    from yaml.constructor import ConstructorError
    from yaml.nodes import MappingNode

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # unhashable: the base class names it
                        continue
                    if duplicate:
                        raise ConstructorError("while constructing a mapping", node.start_mark,
                                               f"found duplicate key {show(key)}", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node):
            try:
                return super().construct_yaml_int(node)
            except ValueError:
                raise ConstructorError(None, None, "an integer with too many digits", node.start_mark) from None

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    return Loader


def parse_config(path: Path, source: str) -> Any:
    """The parsed YAML or TOML document, or one ConfigError line with the line and column."""
    import tomllib

    import yaml

    name = repr(str(path))
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(source)
        return yaml.load(source, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except tomllib.TOMLDecodeError as error:
        problem = _toml_message(error)
    except yaml.YAMLError as error:
        problem = _yaml_message(error, source)
    except RecursionError:
        problem = "values nested too deeply"
    except ValueError as error:  # tomllib: an integer longer than Python converts
        problem = "an integer with too many digits" if "digits" in str(error) else one_line(error, 300)
    raise ConfigError(f"audit config {name} does not parse: {problem}")
