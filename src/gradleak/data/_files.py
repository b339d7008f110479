"""Reading untrusted files: never block, never read more than a stated bound, one-line errors.

Every reader here opens the path with ``O_NONBLOCK`` and checks with ``fstat`` that it is a
regular file before reading a byte, so a FIFO (or a device such as ``/dev/zero``) named like
a data file is refused at once instead of blocking or streaming forever, and the size check
happens on the file actually opened (no race between a check and the open). Messages quote
paths with ``repr`` so that a file name holding a newline still gives one line.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DataError, one_line

__all__ = ["quote", "printable", "existing_dir", "open_regular", "read_bounded", "read_json", "read_safetensors", "sniff_pickle"]

_FILE_KINDS = {
    stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link",
}
_MAX_SAFETENSORS_HEADER = 64 * 2**20


def quote(path: str | os.PathLike) -> str:
    """A path as it appears in messages: ``repr`` of its text (escapes newlines and odd bytes)."""
    return repr(os.fspath(path))


def printable(name: str) -> str:
    """``name`` with every non-printable character (newline, control, lone surrogate from a
    non-UTF-8 file name) replaced by its backslash escape: safe in one-line messages and in
    UTF-8 output (HTML, JSON)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def existing_dir(path: str | os.PathLike, where: str) -> Path:
    """``path`` as a Path to an existing folder, or a DataError saying what it is instead."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise DataError(f"{where}: path {quote(path)} does not exist") from None
        raise DataError(f"{where}: path {quote(path)}: cannot access ({one_line(error.strerror or error)})") from None
    if not stat.S_ISDIR(info.st_mode):
        what = "a file" if stat.S_ISREG(info.st_mode) else kind_of(info.st_mode)
        raise DataError(f"{where}: path {quote(path)} is {what}, expected a folder")
    return path


def kind_of(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike, what: str, max_bytes: int) -> tuple[BinaryIO, int]:
    """``(binary file object, size)`` for a regular file of at most ``max_bytes`` bytes.

    Opening does not block (``O_NONBLOCK``, cleared again once the file is known to be
    regular); directories, FIFOs, devices, sockets, dangling links and link loops are refused
    with a DataError naming ``what`` and the path.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DataError(f"{what} {quote(path)}: cannot open ({one_line(reason)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{what} {quote(path)}: is {kind_of(info.st_mode)}, expected a regular file")
        if info.st_size > max_bytes:
            raise DataError(f"{what} {quote(path)}: {info.st_size} bytes exceeds the limit of {max_bytes} bytes")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return handle, int(info.st_size)


def read_bounded(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes (re-checked while
    reading, in case the file grows after ``fstat``)."""
    handle, size = open_regular(path, what, max_bytes)
    try:
        with handle:
            data = handle.read(size + 1)  # read(n) allocates n bytes up front: never ask for the limit
    except OSError as error:
        raise DataError(f"{what} {quote(path)}: cannot read ({one_line(error.strerror or error)})") from None
    if len(data) > size:
        raise DataError(f"{what} {quote(path)}: grew while it was read (more than the {size} bytes it had)")
    return data


def read_json(path: str | os.PathLike, what: str, max_bytes: int) -> Any:
    """A JSON document from a bounded regular file: strict UTF-8, nesting errors included."""
    data = read_bounded(path, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {quote(path)}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                        f"{error.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{what} {quote(path)}: invalid JSON (nested too deeply)") from None
    except ValueError as error:
        raise DataError(f"{what} {quote(path)}: invalid JSON ({one_line(error)})") from None


def sniff_pickle(data: bytes) -> str | None:
    """What a file that must not be unpickled looks like, or None: a zip archive (the
    ``torch.save`` format, which holds pickles) or a pickle (protocol 2+ starts with 0x80)."""
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format, which holds pickles)"
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and len(data) >= 2:
        return "a Python pickle"
    return None


def read_safetensors(path: str | os.PathLike, what: str, max_bytes: int) -> dict[str, Any]:
    """The tensors of a safetensors file; a pickle, zip archive, truncated or malformed file
    is refused before anything is parsed or allocated beyond the file's own bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    data = read_bounded(path, what, max_bytes)
    if len(data) < 8:
        raise DataError(f"{what} {quote(path)}: {len(data)} bytes is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_SAFETENSORS_HEADER, len(data) - 8):
        found = sniff_pickle(data)
        if found is not None:
            raise DataError(f"{what} {quote(path)}: refused: it is {found}, not a safetensors file; gradleak "
                            "never unpickles these files")
        raise DataError(f"{what} {quote(path)}: not a safetensors file (header length {length} does not fit "
                        f"the {len(data)}-byte file)")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise DataError(f"{what} {quote(path)}: the safetensors header is not valid JSON ({one_line(error)})") from None
    if not isinstance(header, dict):
        raise DataError(f"{what} {quote(path)}: the safetensors header is not a JSON object")
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as error:
        raise DataError(f"{what} {quote(path)}: malformed safetensors data ({one_line(error)})") from None
