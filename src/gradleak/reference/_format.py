"""Markdown pieces the reference page is built from: table cells, defaults, types, docstrings.

Everything here reads the code (signatures, dataclass fields, docstrings, source comments);
nothing is written by hand, so the page cannot drift from what the code accepts.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
from typing import Any, Iterable, Sequence

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj):`(~?)([^`]+)`")
_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?#\s*(.+?)\s*$")
_MISSING = "—"


def own_doc(obj: Any) -> str:
    """The object's own docstring (a class without one does not inherit its parent's); a
    dataclass's generated ``Name(field: type, ...)`` signature counts as none."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not doc or (isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return ""
    return inspect.cleandoc(doc)


def paragraphs(doc: str) -> list[str]:
    """The docstring's paragraphs, each on one line, reST roles and double backticks made Markdown."""
    return [markdown_text(" ".join(line.strip() for line in block.splitlines()))
            for block in re.split(r"\n\s*\n", doc.strip()) if block.strip()]


def first_paragraph(obj: Any) -> str:
    parts = paragraphs(own_doc(obj))
    return parts[0] if parts else ""


def markdown_text(text: str) -> str:
    """``x`` -> `x`; :class:`~a.b.C` -> `C`; :func:`a.b` -> `a.b`."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return text.replace("``", "`")


def cell(text: Any) -> str:
    """A table cell: one line, pipes escaped (an empty cell stays empty)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: Any) -> str:
    return f"`{text}`" if str(text) else _MISSING


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table (cells already formatted; pipes escaped here)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


def default_text(value: Any) -> str:
    """A default as Python would write it (enums by value); no memory addresses."""
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    text = repr(value)
    if " at 0x" in text or text.startswith("<"):
        text = f"<{type(value).__name__}>"
    return code(text)


def type_text(annotation: Any, default: Any = inspect.Parameter.empty) -> str:
    """An annotation as written in the source (``from __future__ import annotations`` keeps
    them strings); without one, the default's type."""
    if annotation is inspect.Parameter.empty or annotation is None:
        if default in (inspect.Parameter.empty, dataclasses.MISSING, None):
            return ""
        return code(type(default).__name__)
    if isinstance(annotation, str):
        return code(annotation)
    return code(getattr(annotation, "__name__", None) or repr(annotation).replace("typing.", ""))


def field_notes(cls: type) -> dict[str, str]:
    """Per-field descriptions of a dataclass: the comment after the field in the source
    (``tv: float = 0.0  # total variation weight``), else a ``field: text`` line of the
    class docstring (continued on indented lines)."""
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    notes: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    for line in source.splitlines():
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in names:
            notes.setdefault(match.group(1), match.group(2))
    for name, text in _docstring_fields(own_doc(cls), names).items():
        notes.setdefault(name, text)
    return {name: markdown_text(text) for name, text in notes.items() if text}


def _docstring_fields(doc: str, names: set[str]) -> dict[str, str]:
    """``field: text`` entries of a docstring, continued on indented lines. An entry that runs
    on into unindented prose is dropped: the prose is about more than that field."""
    found: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        match = re.match(r"^(\w+):\s*(.*)$", line)
        if match and match.group(1) in names:
            current = match.group(1)
            found[current] = match.group(2)
        elif current and line.startswith((" ", "\t")) and line.strip():
            found[current] += " " + line.strip()
        elif current and line.strip():
            found.pop(current)
            current = None
        else:
            current = None
    return found


def dataclass_rows(cls: type, values: Any = None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) per field of a dataclass; ``values`` (an instance)
    gives the defaults instead of the class's."""
    notes = field_notes(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if values is not None:
            default: Any = getattr(values, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append((code(f.name), type_text(f.type, default), default_text(default), notes.get(f.name, "")))
    return rows


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")
