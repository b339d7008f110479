"""The HTML primitives every gradleak page shares: one stylesheet, escaped values, number
cells, tables, embedded PNGs and :func:`html_page` (self-contained, a Content-Security-Policy
that forbids every request and script). Run reports (:mod:`gradleak.report.html`), audit
reports, Flower audit reports and comparisons are built from these."""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

__all__ = ["html_page", "image_tag"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NA = "n/a"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 2rem 1.25rem 3rem; }
img { max-width: 100%; height: auto; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid #d8dee4; }
.subtitle { color: #59636e; margin: 0 0 1rem; }
table { border-collapse: collapse; font-size: .92rem; margin: .25rem 0; }
th, td { border: 1px solid #d8dee4; padding: .3rem .65rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { white-space: nowrap; }
td code, th code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em; }
figure { margin: .5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d8dee4; }
.note { color: #59636e; font-style: italic; }
ul.notes li { margin: .2rem 0; }
footer { margin-top: 3rem; color: #8c959f; font-size: .8rem; }
.wide { overflow-x: auto; }
details summary { cursor: pointer; margin: .2rem 0; }
"""


# --- value handling -------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A float from a JSON number or the strings ``"inf"``/``"-inf"``/``"nan"``; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in {"inf", "+inf", "-inf", "nan", "infinity", "-infinity"}:
        return float(value)
    return None


def _text(value: Any) -> str:
    """Any JSON value as escaped HTML text (``null`` → n/a, ``"inf"`` → ∞)."""
    if value is None:
        return _NA
    if isinstance(value, bool):
        return "true" if value else "false"
    number = _number(value)
    if number is not None and not math.isfinite(number):
        return _nonfinite(number)
    if isinstance(value, (dict, list)):
        return escape(json.dumps(value, ensure_ascii=False, sort_keys=True))
    return escape(str(value))


def _nonfinite(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    return "∞" if number > 0 else "−∞"


def _fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec`` (∞ for infinity, n/a when absent), as escaped HTML."""
    number = _number(value)
    if number is None:
        return _text(value)
    if not math.isfinite(number):
        return _nonfinite(number)
    if spec == "d":  # an index: an integer when it is one
        return str(int(number)) if number.is_integer() else format(number, "g")
    return format(number, spec)


_MAX_EMBED_BYTES = 64 * 2**20   # a PNG embedded in a page, or a JSON file a page reads


def _png_data_uri(path: Path) -> tuple[str | None, str | None]:
    """``(data URI, None)`` for a PNG file, or ``(None, reason)`` when it cannot be embedded.
    A symbolic link is never followed: a page would otherwise embed whatever it points to."""
    from ..data._files import read_bounded
    from ..errors import DataError

    if path.is_symlink():
        return None, f"{path.name} is a symbolic link; not embedded."
    if not path.is_file():
        return None, f"{path.name} not found in the run folder."
    try:
        data = read_bounded(path, "figure", _MAX_EMBED_BYTES)
    except DataError as error:
        return None, f"{path.name} could not be read: {error}"
    if not data.startswith(_PNG_SIGNATURE):
        return None, f"{path.name} is not a PNG file; not embedded."
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), None


def image_tag(path: str | os.PathLike, alt: str = "") -> str:
    """An ``<img>`` embedding the PNG at ``path`` (or a note saying why it is missing)."""
    uri, problem = _png_data_uri(Path(path))
    if uri is None:
        return f"<p class='note'>{escape(problem or '')}</p>"
    return f"<img src='{uri}' alt='{escape(alt)}'>"


# --- sections -------------------------------------------------------------------------


class _Num(str):
    """An escaped table cell holding a number: right-aligned with tabular figures."""


def _table(headers: Iterable[str] | None, rows: Iterable[Iterable[str]], css_class: str = "") -> str:
    """An HTML table from already-escaped cells; in a ``kv`` table the first cell is a header."""
    lines = [f'<table class="{css_class}">' if css_class else "<table>"]
    if headers is not None:
        lines.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr></thead>")
    lines.append("<tbody>")
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            if index == 0 and css_class == "kv":
                cells.append(f"<th>{cell}</th>")
            elif isinstance(cell, _Num):
                cells.append(f'<td class="num">{cell}</td>')
            else:
                cells.append(f"<td>{cell}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def html_page(title: str, subtitle: str, sections: Iterable[str]) -> str:
    """A self-contained page: escaped ``title``, an already-escaped ``subtitle`` and
    ``sections`` of HTML; a Content-Security-Policy forbids every request and script."""
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<h1>{escape(title)}</h1>",
            f'<p class="subtitle">{subtitle}</p>',
            *sections,
            "<footer>Generated by gradleak.</footer>",
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )
