"""A single self-contained HTML report of one run folder.

The report reads ``config.json``, ``metrics.json``, ``grid.png`` and ``curves.png`` from the
run folder. Every one of them may be missing or malformed: the report then says so and goes
on. Every string that comes from a JSON file is escaped (update files, and so configs, may
come from untrusted clients); images are embedded as ``data:`` URIs; a Content-Security-Policy
forbids every request and every script, so the file can be opened and mailed safely.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Iterable, Mapping
from html import escape
from pathlib import Path
from typing import Any

from gradleak._io import atomic_write_text

__all__ = ["render_html", "write_html_report", "image_tag", "html_page"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NA = "n/a"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 960px; margin: 0 auto; padding: 2rem 1.25rem 3rem; }
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


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, value)`` pairs, in file order."""
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _config_value(value: Any) -> str:
    """A configuration value: scalars as text, flat lists comma-separated, the rest as JSON."""
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_text(v) for v in value) if value else "[]"
    if isinstance(value, Mapping):
        return "{}"
    return _text(value)


# --- reading the run folder -----------------------------------------------------------


_MAX_EMBED_BYTES = 64 * 2**20   # a PNG embedded in a report, or a JSON file it reads


def _load_json(path: Path, problems: list[str]) -> Any | None:
    """The parsed JSON file, or None (with a line in ``problems``) when missing or unreadable.
    Read bounded, never from a FIFO or device."""
    from ..data._files import read_json
    from ..errors import DataError

    if not path.is_file():
        problems.append(f"{path.name} not found in the run folder.")
        return None
    try:
        return read_json(path, "run file", _MAX_EMBED_BYTES)
    except DataError as error:
        problems.append(f"{path.name} could not be read: {error}")
        return None


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


def _lpips_summary(summary: Mapping[str, Any], lpips: Any) -> str:
    if _number(summary.get("lpips_mean")) is not None:
        return _fmt(summary["lpips_mean"], ".4f")
    if isinstance(lpips, Mapping) and lpips.get("available") is False:
        reason = lpips.get("reason")
        return "unavailable: " + _text(reason) if reason else "unavailable"
    return _NA


def _summary_section(metrics: Mapping[str, Any]) -> str:
    summary = metrics.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    mean, std = summary.get("psnr_mean"), _number(summary.get("psnr_std"))
    psnr = _fmt(mean, ".2f")
    if psnr != _NA:
        psnr += f" ± {_fmt(std, '.2f')} dB" if std is not None and math.isfinite(std) else " dB"
    accuracy = _number(summary.get("label_accuracy"))
    rows = [
        ("images", _text(summary.get("n_images"))),
        ("PSNR (mean ± std)", psnr),
        ("SSIM (mean)", _fmt(summary.get("ssim_mean"), ".4f")),
        ("MSE (mean)", _fmt(summary.get("mse_mean"), ".3e")),
        ("LPIPS (mean)", _lpips_summary(summary, metrics.get("lpips"))),
        (
            "label accuracy",
            f"{accuracy * 100:.1f} %" if accuracy is not None and math.isfinite(accuracy) else _NA,
        ),
    ]
    known = {"n_images", "psnr_mean", "psnr_std", "ssim_mean", "mse_mean", "lpips_mean", "label_accuracy"}
    for key, value in summary.items():
        if key not in known:
            rows.append((escape(str(key)), _fmt(value, ".4g")))
    rows += _residual_rows(metrics)
    return "<h2>Summary</h2>\n" + _table(None, rows, "kv")


def _residual_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The update residual (truth-free, ``gradleak.residual``) and the attacks ``auto`` tried, when recorded."""
    rows, residual, auto = [], metrics.get("residual"), metrics.get("auto")
    if isinstance(residual, Mapping):
        certified, updates = _number(residual.get("certified")), _number(residual.get("updates"))
        verdict = "" if certified is None or updates is None else (
            f" ({int(certified)} of {int(updates)} update(s) <strong>certified exact</strong>)" if certified
            else f" (none of {int(updates)} update(s) certified exact)")
        rows.append(("update residual (median; truth-free)", _fmt(residual.get("median"), ".3g") + verdict))
    if isinstance(auto, Mapping) and isinstance(auto.get("attempts"), list):
        tried = [f"{_text(a.get('attack'))}: {_text(a.get('status'))}" + (
                 f", residual {_fmt(a['residual'].get('value'), '.3g')}" if isinstance(a.get("residual"), Mapping)
                 else "") for a in auto["attempts"] if isinstance(a, Mapping)]
        rows.append(("attacks='auto' tried", "; ".join(tried) or _NA))
    return rows


_PER_IMAGE_COLUMNS = {
    "index": ("index", "d"),
    "matched_to": ("matched to", "d"),
    "psnr": ("PSNR (dB)", ".2f"),
    "ssim": ("SSIM", ".4f"),
    "mse": ("MSE", ".3e"),
    "lpips": ("LPIPS", ".4f"),
}


def _per_image_section(metrics: Mapping[str, Any]) -> str:
    heading = "<h2>Per image</h2>\n"
    entries = metrics.get("per_image")
    rows = [entry for entry in entries if isinstance(entry, Mapping)] if isinstance(entries, list) else []
    if not rows:
        return heading + '<p class="note">No per-image metrics (no ground truth for this run).</p>'
    keys: list[str] = [key for key in _PER_IMAGE_COLUMNS if any(key in row for row in rows)]
    for row in rows:
        keys.extend(str(key) for key in row if str(key) not in keys)
    keys = [key for key in keys if key == "index" or any(row.get(key) is not None for row in rows)]
    headers = [escape(_PER_IMAGE_COLUMNS.get(key, (key, ""))[0]) for key in keys]
    body = []
    for row in rows:
        cells = []
        for key in keys:
            spec = _PER_IMAGE_COLUMNS.get(key, (key, ".4g"))[1]
            cells.append(_Num(_fmt(row.get(key), spec)))
        body.append(cells)
    return heading + _table(headers, body)


def _figure_section(run_dir: Path, file_name: str, heading: str, alt: str) -> str:
    uri, problem = _png_data_uri(run_dir / file_name)
    if uri is None:
        return f'<h2>{heading}</h2>\n<p class="note">{escape(problem or "")}</p>'
    return f'<h2>{heading}</h2>\n<figure><img src="{uri}" alt="{escape(alt)}"></figure>'


def _note_text(note: Any) -> str:
    if isinstance(note, Mapping):
        return "; ".join(f"{escape(str(key))}: {_text(value)}" for key, value in note.items())
    return _text(note)


def _notes_section(metrics: Mapping[str, Any], problems: list[str]) -> str:
    notes = metrics.get("notes")
    items = notes if isinstance(notes, list) else ([] if notes is None else [notes])
    lines = [f"<li>{_note_text(note)}</li>" for note in items]
    lines += [f'<li class="note">{escape(problem)}</li>' for problem in problems]
    if not lines:
        return '<h2>Notes</h2>\n<p class="note">No notes recorded.</p>'
    return '<h2>Notes</h2>\n<ul class="notes">\n' + "\n".join(lines) + "\n</ul>"


def _config_section(config: Any) -> str:
    heading = "<h2>Run configuration</h2>\n"
    if config is None:
        return heading + '<p class="note">No configuration recorded.</p>'
    if not isinstance(config, Mapping):
        config = {"value": config}
    rows = [(f"<code>{escape(str(key))}</code>", _config_value(value)) for key, value in _flatten(config)]
    if not rows:
        return heading + '<p class="note">The configuration is empty.</p>'
    return heading + _table(None, rows, "kv")


def _attack_name(metrics: Mapping[str, Any], config: Any) -> str | None:
    """The attack's name from metrics.json, else from config.json (``attack`` or ``attack.name``)."""
    for source in (metrics, config if isinstance(config, Mapping) else {}):
        attack = source.get("attack")
        if isinstance(attack, Mapping):
            attack = attack.get("name")
        if attack is not None and not isinstance(attack, (list, dict)):
            return str(attack)
    return None


# --- public API -----------------------------------------------------------------------


def render_html(run_dir: str | os.PathLike) -> str:
    """The HTML report of a run folder, as one self-contained string.

    Reads ``config.json``, ``metrics.json``, ``grid.png`` and ``curves.png`` from ``run_dir``;
    each may be missing (the report notes it). Raises :class:`NotADirectoryError` when
    ``run_dir`` is not a folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {str(run_dir)!r} does not exist or is not a folder")
    problems: list[str] = []
    config = _load_json(run_dir / "config.json", problems)
    metrics = _load_json(run_dir / "metrics.json", problems)
    if metrics is not None and not isinstance(metrics, Mapping):
        problems.append("metrics.json does not hold a JSON object; ignored.")
        metrics = None
    metrics = metrics or {}

    attack = _attack_name(metrics, config)
    title = f"Gradient leakage report: {attack}" if attack else "Gradient leakage report"
    sections = [
        _summary_section(metrics),
        _figure_section(run_dir, "grid.png", "Reconstructions", "originals and reconstructions"),
        _figure_section(run_dir, "curves.png", "Curves", "optimisation curves"),
        _per_image_section(metrics),
        _notes_section(metrics, problems),
        _config_section(config),
    ]
    subtitle = f"Run folder <code>{escape(run_dir.resolve().name)}</code>" + _threat_line(config)
    return html_page(title, subtitle, sections)


def _threat_line(config: Any) -> str:
    """`` · threat model C (Parameter-Aware Eavesdropper, SoK): why`` when the run recorded one."""
    label = config.get("threat_model") if isinstance(config, Mapping) else None
    if not isinstance(label, Mapping) or not all(isinstance(label.get(k), str) for k in ("id", "name", "why")):
        return ""
    return (f" &middot; threat model <b>{escape(label['id'])}</b> ({escape(label['name'])}, SoK on gradient "
            f"inversion in FL): {escape(label['why'])}")


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


def write_html_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` atomically (see :func:`render_html`) and return its path."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / "report.html", render_html(run_dir))
