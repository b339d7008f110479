"""The audit report: verdicts, the privacy-utility picture, the table of every cell.

Writes into the audit folder: ``audit.json`` (every number), ``cells.csv``,
``privacy_utility.png`` (attack PSNR against the accuracy of federated training under the
same defense), ``psnr_by_defense.png`` and ``report.html`` (self-contained; the cells'
reconstruction grids embedded, each cell's own report linked).
"""

from __future__ import annotations

import csv
import io
import math
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_write_json, atomic_write_text, save_figure
from .figures import _new_figure, fit_title
from .page import _Num, _fmt, _table, html_page, image_tag

if TYPE_CHECKING:  # pragma: no cover
    from ..audit.results import AuditResult

__all__ = ["write_audit_report", "privacy_utility_figure", "psnr_by_defense_figure"]

_LEVEL_COLOURS = {"leaks": "#cf222e", "partial": "#9a6700", "protected": "#1a7f37", "not-measured": "#59636e"}


EXACT_DB = 60.0  # PSNR drawn no higher than this: beyond it a reconstruction is exact to the eye


def _psnr(cell) -> float | None:
    value = cell.summary.get("psnr_mean") if cell.status == "done" else None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _drawn(psnr: float) -> float:
    """PSNR for plotting: exact reconstructions (up to inf) are drawn at EXACT_DB, never dropped."""
    return min(psnr, EXACT_DB)


def _series(result: "AuditResult") -> dict[str, list]:
    """(attack, model, batch) -> cells in defense order."""
    series: dict[str, list] = {}
    with_images = {c.attack for c in result.cells if _psnr(c) is not None}
    for cell in result.cells:
        if cell.attack not in with_images:
            continue  # attacks that recover features, not images, have no PSNR to plot
        name = cell.attack
        if len(result.config.models) > 1:
            name += f", {cell.model}"
        if len(result.config.batch_sizes) > 1:
            name += f", batch {cell.batch_size}"
        series.setdefault(name, []).append(cell)
    return series


def _grouped(points: list[tuple[float, float, int]], span: tuple[float, float]) -> list[tuple[float, float, str]]:
    """Points that land within 2 % of the axes of each other share one label (``3,7,9``)."""
    groups: list[tuple[float, float, list[int]]] = []
    for x, y, index in points:
        for gx, gy, members in groups:
            if abs(gx - x) <= 0.02 * span[0] and abs(gy - y) <= 0.02 * span[1]:
                members.append(index)
                break
        else:
            groups.append((x, y, [index]))
    return [(x, y, ",".join(str(i) for i in sorted(members))) for x, y, members in groups]


def privacy_utility_figure(result: "AuditResult", path: Path) -> Path | None:
    """Mean attack PSNR (y) against test accuracy of federated training (x): one panel per
    attack (and model / batch size), one point per defense entry, numbered as in the report's
    table, coloured by the cell's verdict (:func:`gradleak.audit.verdict.cell_level`: the same
    per-image rule as the verdict matrix). PSNR above EXACT_DB (exact recovery) is drawn at EXACT_DB."""
    from matplotlib.patches import Patch

    from ..audit.verdict import cell_level

    if not result.utility:
        return None
    series = {name: cells for name, cells in _series(result).items()
              if any(_psnr(c) is not None and (result.utility.get(c.defense_index) or {}).get("accuracy") is not None
                     for c in cells)}
    if not series:
        return None
    cols = min(len(series), 2)
    rows = math.ceil(len(series) / cols)
    fig = _new_figure(5.4 * cols, 4.2 * rows + 0.9)
    rule = result.config.verdict
    for k, (name, cells) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        points = []
        for cell in cells:
            accuracy = (result.utility.get(cell.defense_index) or {}).get("accuracy")
            psnr = _psnr(cell)
            if accuracy is None or psnr is None:
                continue
            ax.scatter([100 * accuracy], [_drawn(psnr)], s=30, color=_LEVEL_COLOURS[cell_level(cell)], zorder=3)
            points.append((100 * accuracy, _drawn(psnr), cell.defense_index))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        span = (max(max(xs) - min(xs), 1.0), max(max(ys) - min(ys), 1.0)) if points else (1.0, 1.0)
        for x, y, label in _grouped(points, span):
            ax.annotate(label, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.axhline(rule.recognisable_psnr, color=_LEVEL_COLOURS["leaks"], ls="--", lw=0.8)
        ax.axhline(rule.partial_psnr, color=_LEVEL_COLOURS["partial"], ls=":", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("test accuracy (%)", fontsize=9)
        ax.set_ylabel(f"mean PSNR (dB; >= {EXACT_DB:g} drawn at {EXACT_DB:g})" if k % cols == 0 else "", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [Patch(color=_LEVEL_COLOURS[level], label=words) for level, words in (
        ("leaks", f"leaks: some image {rule.describe()}"), ("partial", f"partial: some image {rule.describe('partial')}"),
        ("protected", "protected: neither"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    u = result.config.utility
    title = (f"Privacy against utility (lower right is better): {u.model} trained federatedly on {u.data}; "
             "numbers: the defense entries of the report's table")
    fig.suptitle(fit_title(title, fig.get_figwidth(), 10), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=110)


def psnr_by_defense_figure(result: "AuditResult", path: Path) -> Path | None:
    """Horizontal bars: mean ± std PSNR per defense entry, one bar per attack series."""
    series = _series(result)
    defenses = sorted({(c.defense_index, c.defense) for c in result.cells})
    if not defenses or not series:
        return None
    height = 0.8 / len(series)
    fig = _new_figure(7.5, 1.0 + 0.45 * len(defenses) * max(1, len(series)) ** 0.5)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(defenses))
    for k, (name, cells) in enumerate(series.items()):
        by_index = {c.defense_index: c for c in cells}
        means = [_psnr(by_index[i]) if i in by_index else None for i, _ in defenses]
        stds = [by_index[i].summary.get("psnr_std") if i in by_index and by_index[i].status == "done" else None
                for i, _ in defenses]
        stds = [s if isinstance(s, (int, float)) and math.isfinite(s) else 0.0 for s in stds]
        ax.barh(y + k * height, [_drawn(m) if m is not None else 0.0 for m in means], height, xerr=stds, label=name,
                capsize=2)
    rule = result.config.verdict
    ax.axvline(rule.recognisable_psnr, color="#cf222e", ls="--", lw=1)
    ax.axvline(rule.partial_psnr, color="#9a6700", ls=":", lw=1)
    ax.set_yticks(y + height * (len(series) - 1) / 2, [label for _, label in defenses], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("PSNR (dB), mean ± std over images")
    ax.legend(fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def _cells_csv(result: "AuditResult") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", "model", "attack", "server", "threat_model", "defense", "batch_size", "status", "psnr_mean", "psnr_std", "ssim_mean",
                     "lpips_mean", "label_accuracy", "recognisable", "n_images", "residual_median", "certified_updates",
                     "updates", "epsilon_update", "epsilon_budget", "utility_accuracy", "seconds", "message"])
    for c in result.cells:
        s = c.summary
        writer.writerow([c.cell_id, c.model, c.attack, c.server, c.threat_model, c.defense, c.batch_size, c.status, s.get("psnr_mean"),
                         s.get("psnr_std"), s.get("ssim_mean"), s.get("lpips_mean"), s.get("label_accuracy"),
                         c.levels.get("recognisable"), len(c.psnr) or None, s.get("residual_median"),
                         sum(c.certified) if c.residual else None, len(c.residual) or None, c.privacy.get("epsilon"),
                         c.privacy.get("epsilon_budget"),
                         (result.utility.get(c.defense_index) or {}).get("accuracy"), round(c.seconds, 2), c.message])
    return buffer.getvalue()


def _pm(mean: Any, std: Any, spec: str) -> str:
    text = _fmt(mean, spec)
    return text if std is None or text == "n/a" else f"{text} ± {_fmt(std, spec)}"


def _level_html(level: str) -> str:
    """A verdict level in its colour, bold (the verdict list and the matrix)."""
    return f'<span style="color:{_LEVEL_COLOURS.get(level, "#1f2328")};font-weight:600">{escape(level)}</span>'


def _verdict_matrix(result: "AuditResult") -> str:
    """Defense entries (rows) x (model, batch size) (columns): each verdict's level, coloured,
    with the most images any attack recovered recognisably. Empty for a single column and row."""
    columns = list(dict.fromkeys((v["model"], v["batch_size"]) for v in result.verdicts))
    rows = list(dict.fromkeys((v["defense_index"], v["defense"]) for v in result.verdicts))
    if len(columns) * len(rows) < 2:
        return ""
    n_images = {(c.model, c.defense_index, c.batch_size): len(c.psnr) for c in result.cells if c.psnr}
    most = {}
    for c in result.cells:
        key = (c.model, c.defense_index, c.batch_size)
        most[key] = max(most.get(key, 0), c.levels.get("recognisable", 0))
    by_key = {(v["model"], v["batch_size"], v["defense_index"]): v for v in result.verdicts}
    many_batches = len({b for _, b in columns}) > 1
    headers = ["#", "defense"] + [escape(m + (f", batch {b}" if many_batches else "")) for m, b in columns]
    body = []
    for index, label in rows:
        row = [_Num(str(index)), escape(label)]
        for model, batch in columns:
            v = by_key.get((model, batch, index))
            if v is None:
                row.append("")
                continue
            count = n_images.get((model, index, batch))
            found = f" ({most.get((model, index, batch), 0)}/{count})" if count and v["level"] != "not-measured" else ""
            row.append(_level_html(v["level"]) + escape(found))
        body.append(row)
    return ('<p class="note">At a glance: the verdict per defense and model; in brackets, the most images any '
            'attack recovered recognisably, of those attacked.</p>\n<div class="wide">' + _table(headers, body) + "</div>")


def _verdict_section(result: "AuditResult") -> str:
    items = [f'<li>{_level_html(v["level"])}: {escape(v["text"])}</li>' for v in result.verdicts]
    rule = result.config.verdict
    baseline = ""
    if result.baseline_psnr is not None:
        baseline = (f" For scale: the average of the other attacked images scores {result.baseline_psnr:.1f} dB against "
                    "each image; a reconstruction must clearly beat that to show anything of its image.")
        if result.baseline_psnr >= rule.partial_psnr:
            baseline += " <strong>That is above the partial threshold: raise the thresholds for this data.</strong>"
    return ("<h2>Verdicts</h2>\n"
            f'<p class="note">Per image, {rule.describe()} counts as recognisable and '
            f'{rule.describe("partial")} as partial structure (configurable: <code>verdict</code>).{baseline}</p>\n'
            + _verdict_matrix(result) + '\n<ul class="notes">' + "\n".join(items) + "</ul>")


def _utility_section(result: "AuditResult", out: Path) -> str:
    if not result.utility:
        return '<h2>Privacy and utility</h2>\n<p class="note">No utility training configured (utility: false).</p>'
    series = _series(result)
    headers = ["#", "defense", "test accuracy", "epsilon (training)", "noise multiplier"] + [escape(n) + " PSNR (dB)"
                                                                                        for n in series]
    rows = []
    for index, utility in sorted(result.utility.items()):
        label = next((c.defense for c in result.cells if c.defense_index == index), "?")
        privacy = utility.get("privacy") or {}
        row = [_Num(str(index)), escape(label), _Num(_fmt(None if utility.get("accuracy") is None else 100 * utility["accuracy"], ".1f")
                                   + (" %" if utility.get("accuracy") is not None else "")),
               _Num(_fmt(privacy.get("epsilon_training"), ".2f")), _Num(_fmt(privacy.get("noise_multiplier"), ".3g"))]
        for cells in series.values():
            cell = next((c for c in cells if c.defense_index == index), None)
            row.append(_Num(_pm(cell.summary.get("psnr_mean"), cell.summary.get("psnr_std"), ".1f")
                            if cell is not None and cell.status == "done" else escape(cell.status if cell else "n/a")))
        rows.append(row)
    errors = [f"<li>{escape(str(u.get('error')))}</li>" for u in result.utility.values() if u.get("error")]
    u = result.config.utility
    text = (f'<p class="note">Accuracy: {escape(u.model)} trained federatedly on {escape(u.data)} ({u.clients} clients, '
            f"{u.rounds} rounds, every client applying the defense), on a held-out {100 * u.test_fraction:.0f} % split.</p>")
    figure = image_tag(out / "privacy_utility.png", "attack PSNR against test accuracy per defense")
    return ("<h2>Privacy and utility</h2>\n" + text + f"<figure>{figure}</figure>\n" + _table(headers, rows)
            + (f'<ul class="notes">{"".join(errors)}</ul>' if errors else ""))


def _epsilons(privacy: dict[str, Any]) -> str:
    if privacy.get("epsilon") is None:
        return "n/a"
    return f"{_fmt(privacy['epsilon'], '.2f')} / {_fmt(privacy.get('epsilon_budget'), '.2f')}"


def _cells_section(result: "AuditResult") -> str:
    """Every cell in one table that fits a laptop's screen: who attacked what in one column, the
    status in place of the scores when a cell did not run, LPIPS and epsilon only when measured."""
    lpips = any(c.summary.get("lpips_mean") is not None for c in result.cells)
    epsilon = any(c.privacy.get("epsilon") is not None for c in result.cells)
    headers = ["model / attack (server, SoK)", "defense", "batch", "PSNR (dB)", "SSIM", *(["LPIPS"] if lpips else []),
               "labels", "recognisable", "update residual (certified)", *(["epsilon: update / budget"] if epsilon
                                                                           else []), "s", ""]
    rows = []
    for c in result.cells:
        s = c.summary
        accuracy = s.get("label_accuracy")
        who = (f"{escape(c.model)} / <b>{escape(c.attack)}</b><br><span class='note'>{escape(c.server)}"
               f"{' (' + escape(c.threat_model) + ')' if c.threat_model else ''}</span>")
        if c.status == "done":
            scores = [_Num(_pm(s.get("psnr_mean"), s.get("psnr_std"), ".1f")),
                      _Num(_pm(s.get("ssim_mean"), s.get("ssim_std"), ".3f"))]
        else:
            scores = [escape(c.status) + (f'<br><span class="note">{escape(c.message)}</span>' if c.message else ""), ""]
        rows.append([who, escape(c.defense), _Num(str(c.batch_size)), *scores,
                     *([_Num(_fmt(s.get("lpips_mean"), ".3f"))] if lpips else []),
                     _Num(f"{100 * accuracy:.0f} %" if isinstance(accuracy, (int, float)) else "n/a"),
                     _Num(f"{c.levels.get('recognisable', 0)}/{len(c.psnr)}" if _psnr(c) is not None else "n/a"),
                     _Num(f"{_fmt(s.get('residual_median'), '.2g')} ({sum(c.certified)}/{len(c.residual)})"
                          if c.residual else "n/a"),
                     *([_Num(_epsilons(c.privacy))] if epsilon else []), _Num(f"{c.seconds:.0f}"),
                     f'<a href="cells/{escape(c.cell_id)}/report.html">report</a>'])
    return ('<h2>Every cell</h2>\n<div class="wide">' + _table(headers, rows) + "</div>"
            '<p class="note">cells.csv holds every column of every cell; each cell\'s own report has its images, '
            "curves and notes.</p>")


def _gallery_section(result: "AuditResult", out: Path) -> str:
    parts = []
    for c in result.cells:
        grid = out / "cells" / c.cell_id / "grid.png"
        if c.status == "done" and grid.is_file():
            title = f"{c.model} / {c.attack} / {c.defense} / batch {c.batch_size}: {_fmt(c.summary.get('psnr_mean'), '.1f')} dB"
            parts.append(f"<details><summary>{escape(title)}</summary><figure>{image_tag(grid, title)}</figure></details>")
    return "<h2>Reconstructions</h2>\n" + ("\n".join(parts) or '<p class="note">No finished cell.</p>')


def write_audit_report(result: "AuditResult") -> Path:
    """Write audit.json, cells.csv, the figures and report.html into ``result.out``; return the report path."""
    out = result.out
    atomic_write_json(out / "audit.json", {"config": result.config.to_json(), "cells": [c.to_json() for c in result.cells],
                                           "utility": {str(k): v for k, v in result.utility.items()},
                                           "verdicts": result.verdicts, "interrupted": result.interrupted,
                                           "baseline_psnr": result.baseline_psnr})
    atomic_write_text(out / "cells.csv", _cells_csv(result))
    privacy_utility_figure(result, out / "privacy_utility.png")
    psnr_by_defense_figure(result, out / "psnr_by_defense.png")
    done = sum(c.status == "done" for c in result.cells)
    subtitle = escape(f"{len(result.cells)} cells ({done} measured) over {len(result.config.models)} model(s), "
                      f"{len(result.config.attacks)} attack(s), {len(result.config.defenses)} defense setting(s), "
                      f"batch sizes {', '.join(map(str, result.config.batch_sizes))}; data "
                      f"{result.config.data.get('name')} ({result.config.data.get('n')} images)")
    if result.interrupted:
        subtitle += " <strong>(interrupted: run the same command again to continue)</strong>"
    sections = [_verdict_section(result), _utility_section(result, out),
                "<h2>PSNR by defense</h2>\n<figure>" + image_tag(out / "psnr_by_defense.png", "PSNR by defense") + "</figure>",
                _cells_section(result), _gallery_section(result, out)]
    return atomic_write_text(out / "report.html", html_page(result.config.name, subtitle, sections))
