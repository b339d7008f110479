"""A single self-contained HTML report of one run folder.

The report reads ``config.json``, ``metrics.json``, ``grid.png`` and ``curves.png`` from the
run folder. Every one of them may be missing or malformed: the report then says so and goes
on. Every string that comes from a JSON file is escaped (update files, and so configs, may
come from untrusted clients); images are embedded as ``data:`` URIs; a Content-Security-Policy
forbids every request and every script, so the file can be opened and mailed safely.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

from gradleak._io import atomic_write_text
from gradleak.residual import carried_text
from gradleak.shares import mixture_parts, parts_text

from .page import _MAX_EMBED_BYTES, _NA, _Num, _fmt, _number, _png_data_uri, _table, _text, html_page, image_tag

__all__ = ["render_html", "write_html_report", "image_tag", "html_page"]

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


def _lpips_summary(summary: Mapping[str, Any], lpips: Any) -> str:
    if _number(summary.get("lpips_mean")) is not None:
        return _fmt(summary["lpips_mean"], ".4f")
    if isinstance(lpips, Mapping) and lpips.get("available") is False:
        reason = lpips.get("reason")
        return "unavailable: " + _text(reason) if reason else "unavailable"
    return _NA


_SUMMARY_LABELS = {"psnr_mean": "PSNR (mean ± std)", "ssim_mean": "SSIM (mean ± std)", "mse_mean": "MSE (mean)",
                   "lpips_mean": "LPIPS (mean)", "label_accuracy": "label accuracy"}
_SHOWN_ELSEWHERE = {"n_images", "n_recovered", "n_exact", "psnr_std", "ssim_std", "mse_std", "lpips_std",
                    "residual_median", "certified"}


def _mean_std(summary: Mapping[str, Any], name: str, spec: str, unit: str = "") -> str:
    mean, std = _fmt(summary.get(f"{name}_mean"), spec), _number(summary.get(f"{name}_std"))
    if mean == _NA:
        return mean
    return mean + (f" ± {_fmt(std, spec)}" if std is not None and math.isfinite(std) else "") + unit


def _images_row(summary: Mapping[str, Any]) -> str:
    """``32: 26 recovered, 21 exact (PSNR >= 60 dB); the means are over the recovered`` ."""
    from ..metrics import EXACT_PSNR

    n, got, exact = summary.get("n_images"), _number(summary.get("n_recovered")), _number(summary.get("n_exact"))
    text = _text(n)
    if got is None:
        return text
    text += ": all recovered" if got == _number(n) else f": <strong>{int(got)} recovered</strong>"
    if exact is not None:
        text += f", {int(exact)} exact (PSNR &ge; {EXACT_PSNR:.0f} dB)"
    return text + ("" if got == _number(n) else "; the means below are over the recovered images")


def _summary_section(metrics: Mapping[str, Any]) -> str:
    summary = metrics.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    accuracy = _number(summary.get("label_accuracy"))
    rows = [
        ("images", _images_row(summary)),
        (_SUMMARY_LABELS["psnr_mean"], _mean_std(summary, "psnr", ".2f", " dB")),
        (_SUMMARY_LABELS["ssim_mean"], _mean_std(summary, "ssim", ".4f")),
        (_SUMMARY_LABELS["mse_mean"], _fmt(summary.get("mse_mean"), ".3e")),
        (_SUMMARY_LABELS["lpips_mean"], _lpips_summary(summary, metrics.get("lpips"))),
        (_SUMMARY_LABELS["label_accuracy"],
         f"{accuracy * 100:.1f} %" if accuracy is not None and math.isfinite(accuracy) else _NA),
    ]
    for key, value in summary.items():  # anything a newer gradleak records, in words
        if key not in _SUMMARY_LABELS and key not in _SHOWN_ELSEWHERE:
            rows.append((escape(str(key).replace("_", " ")), _fmt(value, ".4g")))
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
        rows += _share_rows(residual.get("per_update"))
    notes = metrics.get("notes")
    parts = mixture_parts(notes, None) if isinstance(notes, list) else None   # skips entries that are not text
    if parts is not None:
        rows.append(("explaining the fitted update (truth-free)",
                     f"{parts_text(parts)}; largest part {100 * max(parts):.3g} %; the grid gives each image's part"))
    if isinstance(auto, Mapping) and isinstance(auto.get("attempts"), list):
        tried = [f"{_text(a.get('attack'))}: {_text(a.get('status'))}" + (
                 f", residual {_fmt(a['residual'].get('value'), '.3g')}" if isinstance(a.get("residual"), Mapping)
                 else "") for a in auto["attempts"] if isinstance(a, Mapping)]
        rows.append(("attacks='auto' tried", "; ".join(tried) or _NA))
    return rows


def _share_rows(per_update: Any) -> list[tuple[str, str]]:
    """How many reconstructed inputs carry their update (``gradleak.shares``), when every update recorded shares."""
    text = carried_text({"per_update": per_update}) if isinstance(per_update, list) else ""
    if not text:
        return []
    values = [float(x) for u in per_update for x in u["shares"]]   # carried_text checked every entry
    return [("carrying their update (truth-free)",
             f"{text}; smallest share {_fmt(min(values), '.2g')}: an input below the threshold moves its update, and "
             f"the matching loss, by little")]


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
        keys.extend(str(key) for key in row if str(key) not in keys and key != "recovered")
    keys = [key for key in keys if key == "index" or any(row.get(key) is not None for row in rows)]
    headers = [escape(_PER_IMAGE_COLUMNS.get(key, (key, ""))[0]) for key in keys]
    body = []
    for row in rows:
        if row.get("recovered") is False:  # an image the attack did not recover: said, not dropped
            body.append([_Num(_fmt(row.get("index"), "d")), *(
                "<em>not recovered</em>" if k == 0 else "" for k in range(len(keys) - 1))])
            continue
        body.append([_Num(_fmt(row.get(key), _PER_IMAGE_COLUMNS.get(key, (key, ".4g"))[1])) for key in keys])
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


_UPDATE_NOTE = re.compile(r"^update (\d+): (.*)$", re.S)


def _notes_section(metrics: Mapping[str, Any], problems: list[str]) -> str:
    """The method's notes, each distinct note once: a note several updates gave alike
    ("update 0: label from ...", "update 1: label from ...") is one line naming the updates,
    and a note repeated word for word gets ``(× 8)``."""
    notes = metrics.get("notes")
    items = notes if isinstance(notes, list) else ([] if notes is None else [notes])
    updates: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for note in items:
        match = _UPDATE_NOTE.match(note) if isinstance(note, str) else None
        if match:
            updates.setdefault(_note_text(match.group(2)), []).append(int(match.group(1)))
        else:
            text = _note_text(note)
            counts[text] = counts.get(text, 0) + 1
    total = len({u for indices in updates.values() for u in indices})
    lines = []
    for text, indices in updates.items():
        who = (f"every update ({total})" if len(indices) == total and total > 1 else
               f"update{'s' if len(indices) > 1 else ''} {', '.join(map(str, sorted(set(indices))))}")
        lines.append(f"<li>{who}: {text}</li>")
    lines += [f"<li>{text}" + (f" <span class=\"note\">(&times; {n})</span>" if n > 1 else "") + "</li>"
              for text, n in counts.items()]
    lines += [f'<li class="note">{escape(problem)}</li>' for problem in problems]
    if not lines:
        return '<h2>Notes</h2>\n<p class="note">No notes recorded.</p>'
    return '<h2>Notes</h2>\n<ul class="notes">\n' + "\n".join(lines) + "\n</ul>"


def _deduplicated(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The configuration without what it says twice: the model's name, seed and options are in
    ``model_spec`` (``model`` keeps the input shape and classes), and a top-level device, mode or
    dtype equal to ``model_spec``'s is dropped."""
    spec = config.get("model_spec")
    if not isinstance(spec, Mapping):
        return config
    out = dict(config)
    model = out.get("model")
    if isinstance(model, Mapping):
        out["model"] = {k: v for k, v in model.items()
                        if not (k in ("name", "seed") and spec.get(k) == v) and not (k == "kwargs" and
                                                                                 spec.get("options") == v)}
    for key in ("device", "mode", "dtype"):  # the device stays when it says what "auto" resolved to
        if key in out and str(out[key]) == str(spec.get(key)):
            out.pop(key)
    return out


def _config_section(config: Any) -> str:
    heading = "<h2>Run configuration</h2>\n"
    if config is None:
        return heading + '<p class="note">No configuration recorded.</p>'
    if not isinstance(config, Mapping):
        config = {"value": config}
    rows = [(f"<code>{escape(str(key))}</code>", _config_value(value)) for key, value in _flatten(_deduplicated(config))]
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


def render_html(run_dir: str | os.PathLike, name: str | None = None) -> str:
    """The HTML report of a run folder, as one self-contained string.

    Reads ``config.json``, ``metrics.json``, ``grid.png`` and ``curves.png`` from ``run_dir``;
    each may be missing (the report notes it). ``name``: the folder's name to show (a run is
    written in a staging folder first). Raises :class:`NotADirectoryError` when ``run_dir`` is
    not a folder.
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
    if isinstance(config, Mapping) and "defenses" in config:  # the defense belongs in the title, not only the table
        from ..defenses import stack_label

        title += f" under {stack_label(config['defenses'])}" if config["defenses"] else ", no defense"
    sections = [
        _summary_section(metrics),
        _figure_section(run_dir, "grid.png", "Reconstructions", "originals and reconstructions"),
        _figure_section(run_dir, "curves.png", "Curves", "optimisation curves"),
        _per_image_section(metrics),
        _notes_section(metrics, problems),
        _config_section(config),
    ]
    subtitle = f"Run folder <code>{escape(name or run_dir.resolve().name)}</code>" + _threat_line(config)
    return html_page(title, subtitle, sections)


def _threat_line(config: Any) -> str:
    """`` · threat model C (Parameter-Aware Eavesdropper, SoK): why`` when the run recorded one."""
    label = config.get("threat_model") if isinstance(config, Mapping) else None
    if not isinstance(label, Mapping) or not all(isinstance(label.get(k), str) for k in ("id", "name", "why")):
        return ""
    return (f" &middot; threat model <b>{escape(label['id'])}</b> ({escape(label['name'])}, SoK on gradient "
            f"inversion in FL): {escape(label['why'])}")


def write_html_report(run_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically (see :func:`render_html`) and return its path."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / "report.html", render_html(run_dir, name))
