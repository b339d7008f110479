"""Tensor containers bounded by what they declare, before anything is parsed or inflated.

Update files and weights files are safetensors (a JSON header, then raw bytes) or, for
weights, PyTorch's ``torch.save`` zip archives. Both say how big they are before their
contents are read: the safetensors header gives every tensor's dtype, shape and byte range,
the zip's central directory every entry's sizes and compression. These checks read only
those declarations and refuse, in one line, what a loader would otherwise spend seconds and
gigabytes on before failing: 600,000 empty tensors in a 38 MB header, a 3 MB archive that
inflates to 3 GiB, dtypes no model holds (float8, complex), byte ranges outside the file.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from typing import Any, Callable

__all__ = ["MAX_TENSORS", "MAX_HEADER", "SAFETENSORS_DTYPES", "is_safetensors", "safetensors_header",
           "check_torch_zip"]

MAX_TENSORS = 100_000          # tensors in one file (ResNet-152: ~1,000; GPT-2 small: 148)
MAX_HEADER = 64 * 2**20        # bytes of safetensors header
# dtypes a model's parameters and buffers hold, with their sizes (float8, complex, uint16.. are refused)
SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1,
                      "BOOL": 1}


def is_safetensors(data: bytes) -> bool:
    """The first bytes look like a safetensors file (a header length in bounds, then ``{``)."""
    if len(data) < 9:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    return length <= MAX_HEADER and data[8:9] == b"{"


def safetensors_header(data: bytes, fail: Callable[[str], Exception], *,
                       dtypes: dict[str, int] | None = SAFETENSORS_DTYPES) -> dict[str, Any]:
    """The parsed header of the safetensors file ``data``, every entry checked against the file:
    at most :data:`MAX_TENSORS` entries (counted in the raw bytes before the JSON is parsed), each
    an allowed dtype with a shape of non-negative ints whose byte range has exactly its size and
    lies inside the file. ``dtypes=None`` leaves dtypes (and so sizes) to the caller, which
    refuses them in its own terms. ``fail(message)`` builds the exception raised (the caller
    names the file)."""
    if len(data) < 8:
        raise fail(f"{len(data)} bytes is too short to be a safetensors file (truncated?)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER:
        raise fail(f"header length {length:,} exceeds the {MAX_HEADER:,}-byte limit (not a safetensors file?)")
    if 8 + length > len(data):
        raise fail(f"truncated: the header claims {length:,} bytes but only {len(data) - 8:,} follow")
    raw = data[8 : 8 + length]
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise fail(f"the header declares more than {MAX_TENSORS:,} tensors")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        from .errors import one_line

        raise fail(f"the safetensors header is not valid JSON ({one_line(error, 200)})") from None
    if not isinstance(header, dict):
        raise fail("the safetensors header is not a JSON object")
    body = len(data) - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(name, entry, body, dtypes, fail)
    return header


def _check_entry(name: str, entry: Any, body: int, dtypes: dict[str, int] | None, fail) -> None:
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not isinstance(entry, dict):
        raise fail(f"header entry {shown!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtypes is not None and dtype not in dtypes:
        allowed = "/".join(dtypes)
        raise fail(f"tensor {shown!r} has dtype {str(dtype)[:20]!r}, which no model parameter holds here "
                   f"(allowed: {allowed})")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise fail(f"tensor {shown!r}: shape must be at most 8 dimensions of 0..2^31-1, got {str(shape)[:60]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise fail(f"tensor {shown!r}: data_offsets must be two integers")
    start, end = offsets
    size = math.prod(shape) * dtypes[dtype] if dtypes is not None else end - start
    if not 0 <= start <= end <= body or end - start != size:
        raise fail(f"tensor {shown!r}: bytes {start}..{end} do not hold its {size:,} bytes inside the file's "
                   f"{body:,}")


def check_torch_zip(data: bytes, fail: Callable[[str], Exception]) -> None:
    """Bound a ``torch.save`` zip archive by its central directory before PyTorch inflates it:
    at most :data:`MAX_TENSORS` + 16 entries, every entry stored uncompressed (``torch.save``
    never compresses, so a DEFLATE entry is a crafted file, possibly a zip bomb), and the
    declared sizes together no larger than the file itself."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            struct.error, UnicodeDecodeError) as error:  # NotImplementedError: "zip file version 12.1"
        from .errors import one_line

        raise fail(f"not a readable zip archive ({one_line(error, 200)})") from None
    if len(entries) > MAX_TENSORS + 16:
        raise fail(f"the archive has {len(entries):,} entries, over the limit of {MAX_TENSORS + 16:,}")
    total = 0
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED:
            raise fail(f"archive entry {info.filename[:80]!r} is compressed ({info.file_size:,} bytes from "
                       f"{info.compress_size:,}); torch.save stores entries uncompressed, so this file was crafted "
                       "(refused before inflating it)")
        total += info.file_size
        if total > len(data):
            raise fail(f"the archive's entries declare more bytes ({total:,}+) than the file holds ({len(data):,})")
