"""Atomic file output: a result is either fully written or not there at all.

Every file gradleak writes goes through these helpers: the bytes are written to a
temporary file in the same folder, flushed to disk, and renamed over the target, so an
interrupted run never leaves a half-written update, figure or report behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "to_jsonable", "save_figure",
           "output_dir", "output_file", "staged_folder", "new_run_dir", "replacing", "RUN_MARKERS", "csv_text"]


def _why(error: OSError) -> str:
    from .errors import one_line

    return error.strerror or one_line(error) or type(error).__name__


def _blocking_file(path: Path) -> Path | None:
    """The first existing component of ``path`` (itself included) that is not a folder."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
        if not part.exists():
            return None
    return None


def _probe(folder: Path, option: str) -> None:
    """Check that a file can be written into ``folder``: create the folders missing on the
    way, write and delete a probe file, then remove the folders it created, so that a check
    leaves nothing behind (the command may still fail on its input afterwards)."""
    created = [p for p in [*reversed(folder.parents), folder] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gradleak-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"{option} {str(folder)!r}: cannot write there ({_why(error)})") from None
    finally:
        for part in reversed(created):
            try:
                part.rmdir()
            except OSError:
                break


def output_dir(value: str | os.PathLike, option: str = "--out") -> Path:
    """A folder results can be written into, checked before any work starts: not an empty
    name, not an existing file or under one, creatable and writable. Raises OutputError."""
    text = os.fspath(value)
    if not str(text).strip():
        raise OutputError(f"{option}: an empty path would write into the current folder; name a folder")
    path = Path(text)
    blocking = _blocking_file(path)
    if blocking is not None:
        what = "is an existing file, not a folder" if blocking == path else f"is under {str(blocking)!r}, which is a file"
        raise OutputError(f"{option} {str(path)!r} {what}")
    _probe(path, option)
    return path


def output_file(value: str | os.PathLike, option: str = "--out", *, overwrite: bool = True) -> Path:
    """A file path a result can be written to (atomically), checked before any work starts;
    with ``overwrite=False`` an existing file is refused (the CLI's ``--overwrite`` allows it)."""
    text = os.fspath(value)
    if not str(text).strip():
        raise OutputError(f"{option}: an empty path is not a file name")
    path = Path(text)
    if path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is an existing folder; name a file")
    if not overwrite and os.path.lexists(path):
        raise OutputError(f"{option} {str(path)!r} already exists; pass --overwrite to replace it")
    blocking = _blocking_file(path.parent)
    if blocking is not None:
        raise OutputError(f"{option} {str(path)!r} is under {str(blocking)!r}, which is a file")
    _probe(path.parent, option)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. A failure (read-only, disk full, a file where a
    folder should be) raises :class:`~gradleak.errors.OutputError` naming the path, and
    leaves neither a partial file nor a temporary one behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"cannot write {str(path)!r}: {_why(error)}") from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(f"cannot write {str(path)!r}: {_why(error)}") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, tuples and non-finite floats to strict JSON values.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON has
    no such numbers, and browsers refuse ``Infinity``); :func:`from_json_float` reads them back.
    """
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def csv_text(header: Any, rows: Any) -> str:
    """A CSV document (a header row, then ``rows``; None as an empty field)."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


def from_json_float(value: Any) -> float | None:
    """Inverse of :func:`to_jsonable` for one number (None stays None)."""
    if value is None:
        return None
    return float(value)  # float("inf") / float("nan") parse the string forms


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n")


def save_figure(figure, path: str | os.PathLike, **kwargs) -> Path:
    """Render a matplotlib figure to PNG bytes in memory, then write them atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder written whole or not at all: the block writes into a hidden sibling
    (``.<name>.partial-XXXX``, same file system); when the block ends normally, each entry it
    wrote is renamed into ``path`` (created if missing; entries of the same name are replaced,
    other files the user keeps there are left alone). When the block raises (a bug, a full disk,
    the user's code exiting, an interrupt the command did not handle), the staging folder is
    removed and ``path`` is as it was: no failure leaves half a run folder. Commands that catch
    Ctrl-C and write what was done end normally, so their partial results are kept."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(stage, 0o755)  # mkdtemp makes 0700; results are meant to be shared
    except OSError as error:
        raise OutputError(f"cannot write {str(target)!r}: {_why(error)}") from None
    try:
        yield stage
        _move_into(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into(stage: Path, target: Path) -> None:
    try:
        if not target.exists():
            os.rename(stage, target)  # the common case: one atomic rename
            return
        for entry in sorted(stage.iterdir()):
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=target))
                os.rename(destination, old / entry.name)
                os.rename(entry, destination)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, destination)
    except OSError as error:
        raise OutputError(f"cannot move the finished results into {str(target)!r}: {_why(error)}") from None


# What makes a folder a gradleak result that --overwrite may replace (run, training, audit, comparison).
RUN_MARKERS = ("report.html", "metrics.json", "training.json", "audit.json", "comparison.csv", "table.json")


def new_run_dir(command: str, out: str | os.PathLike | None, *, overwrite: bool = False,
                root: str | os.PathLike = "runs") -> Path:
    """Where a command writes its results, chosen so that no run silently replaces another.

    Without ``out``: a new ``runs/<command>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken).
    With ``out``: it must be a usable place (:func:`output_dir`); a folder that already holds
    files is refused unless ``overwrite``, and even then only when it is a gradleak result
    (one of :data:`RUN_MARKERS`), never a folder of the user's own files."""
    import time

    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{command}-{stamp}"
        path, k = base, 1
        while path.exists():
            k += 1
            path = base.with_name(f"{base.name}-{k}")
        return output_dir(path)
    path = output_dir(out)
    try:
        held = path.is_dir() and any(path.iterdir())
    except OSError as error:
        raise OutputError(f"--out {str(path)!r}: cannot list it ({_why(error)})") from None
    if held and not overwrite:
        raise OutputError(f"--out {str(path)!r} already holds results; pass --overwrite to replace them, or leave "
                          f"out --out for a new runs/{command}-<date>-<time> folder")
    if held and not any((path / marker).exists() for marker in RUN_MARKERS):
        raise OutputError(f"--out {str(path)!r} holds files but no gradleak results ({', '.join(RUN_MARKERS[:3])}, "
                          "...); --overwrite replaces only a gradleak run folder: choose another --out")
    return path


@contextmanager
def replacing(path: str | os.PathLike, replace: bool = True) -> Iterator[None]:
    """Replace the run folder at ``path`` with what the block writes there, or keep it: the
    old folder is moved aside first, deleted when the block ends normally, and moved back
    when it raises (the block's own writes are staged, so nothing of it is left at ``path``)."""
    target = Path(path)
    if not replace or not target.exists():
        yield
        return
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
        os.rename(target, aside / target.name)
    except OSError as error:
        raise OutputError(f"cannot replace {str(target)!r}: {_why(error)}") from None
    try:
        yield
    except BaseException:
        if not target.exists():
            os.rename(aside / target.name, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
