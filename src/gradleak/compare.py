"""Several run folders side by side: one table, one figure, one CSV.

``gradleak compare RUN [RUN ...]`` (or :func:`compare_runs`) reads each run folder's
``metrics.json`` and ``config.json`` (validated like ``gradleak report`` validates them,
never its tensors) and writes::

    OUT/
      comparison.csv     one row per run: attack, model, defenses, data, images, recovered, exact,
                         PSNR mean/median/min, SSIM, LPIPS, label accuracy, update residual
                         (median, updates certified exact): a run without ground truth still compares
      per_image.csv      one row per run and image: PSNR, SSIM, MSE, LPIPS (blank: not recovered)
      comparison.png     per-image PSNR of each run (dots) over its mean (bar), SSIM, label accuracy
                         and the update residual
      report.html        the table and the figure, self-contained

Runs are named by their folder (made unique by the parent folder where two share a name).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._io import atomic_write_text, csv_text, save_figure, staged_folder
from .errors import ConfigError

__all__ = ["RunRow", "Comparison", "run_row", "compare_runs", "MAX_RUNS"]

MAX_RUNS = 200
COLUMNS = ("run", "attack", "model", "defenses", "data", "threat_model", "n_images", "n_recovered", "n_exact",
           "psnr_mean", "psnr_median", "psnr_min", "ssim_mean", "lpips_mean", "label_accuracy", "residual_median",
           "certified_updates", "updates")


@dataclass
class RunRow:
    """One run's line of the comparison, and its per-image scores."""

    name: str
    path: Path
    values: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def psnrs(self) -> list[float]:
        return [float(r["psnr"]) for r in self.per_image if _finite(r.get("psnr"))]


@dataclass
class Comparison:
    rows: list[RunRow]
    out: Path

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    @property
    def csv(self) -> Path:
        return self.out / "comparison.csv"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _defenses(config: dict[str, Any]) -> str:
    from .defenses import stack_label

    return stack_label(config.get("defenses")) if config.get("defenses") else "none"


def _model(config: dict[str, Any]) -> str:
    spec = config.get("model_spec") if isinstance(config.get("model_spec"), dict) else config.get("model")
    if not isinstance(spec, dict):
        return ""
    options = spec.get("options") or spec.get("kwargs") or {}
    text = str(spec.get("name", ""))
    if isinstance(options, dict) and options:
        text += "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
    return text


def run_row(run_dir: str | os.PathLike, name: str | None = None) -> RunRow:
    """One run folder's summary line (metrics.json and config.json, checked, never the tensors)."""
    from .data._files import read_json
    from ._runfiles import MAX_RUN_JSON_BYTES, _check_metrics, _run_folder

    folder = _run_folder(run_dir)
    metrics = _check_metrics(folder / "metrics.json", read_json(folder / "metrics.json", "run file",
                                                                 MAX_RUN_JSON_BYTES))
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        loaded = read_json(folder / "config.json", "run file", MAX_RUN_JSON_BYTES)
        config = loaded if isinstance(loaded, dict) else {}
    summary = metrics.get("summary") or {}
    per_image = list(metrics.get("per_image") or [])
    row = RunRow(name or folder.name, folder, {}, per_image)
    psnrs = sorted(row.psnrs())
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    residual = metrics.get("residual")  # the truth-free measure (gradleak.residual), when recorded
    row.values = {
        "run": row.name, "attack": metrics.get("attack") or config.get("attack") or "", "model": _model(config),
        "defenses": _defenses(config), "data": str(data.get("name", "")) if data else "",
        "threat_model": (config.get("threat_model") or {}).get("id", "") if isinstance(config.get("threat_model"), dict)
        else str(config.get("threat_model") or ""),
        "n_images": summary.get("n_images"), "n_recovered": summary.get("n_recovered"),
        "psnr_mean": summary.get("psnr_mean"), "psnr_median": psnrs[len(psnrs) // 2] if psnrs else None,
        "psnr_min": psnrs[0] if psnrs else None, "ssim_mean": summary.get("ssim_mean"),
        "lpips_mean": summary.get("lpips_mean"), "label_accuracy": summary.get("label_accuracy"),
        "n_exact": summary.get("n_exact"),
        "residual_median": residual.get("median") if isinstance(residual, dict) else None,
        "certified_updates": residual.get("certified") if isinstance(residual, dict) else None,
        "updates": residual.get("updates") if isinstance(residual, dict) else None,
    }
    return row


def _unique_names(folders: Sequence[Path]) -> list[str]:
    names = [f.name for f in folders]
    out = []
    for folder, name in zip(folders, names):
        out.append(f"{folder.parent.name}/{name}" if names.count(name) > 1 else name)
    seen: dict[str, int] = {}
    for k, name in enumerate(out):  # still equal (same parent name too): number them
        seen[name] = seen.get(name, 0) + 1
        if out.count(name) > 1:
            out[k] = f"{name} ({seen[name]})"
    return out


def compare_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Comparison:
    """Put ``run_dirs`` side by side in the folder ``out`` (see the module's notes)."""
    if not run_dirs:
        raise ConfigError("compare: give at least one run folder")
    if len(run_dirs) > MAX_RUNS:
        raise ConfigError(f"compare: {len(run_dirs)} run folders is more than the limit of {MAX_RUNS}")
    folders = [Path(d) for d in run_dirs]
    rows = [run_row(folder, name) for folder, name in zip(folders, _unique_names(folders))]
    out = Path(out)
    with staged_folder(out) as stage:
        atomic_write_text(stage / "comparison.csv", csv_text(COLUMNS, ([r.values[c] for c in COLUMNS] for r in rows)))
        atomic_write_text(stage / "per_image.csv", csv_text(
            ("run", "image", "recovered", "psnr", "ssim", "mse", "lpips"),
            ([r.name, p.get("index"), p.get("psnr") is not None, p.get("psnr"), p.get("ssim"), p.get("mse"),
              p.get("lpips")] for r in rows for p in r.per_image)))
        _figure(rows, stage / "comparison.png")
        _page(rows, stage)
    return Comparison(rows, out)


def _figure(rows: list[RunRow], path: Path) -> None:
    from .report.figures import _new_figure

    height = max(2.6, 0.42 * len(rows) + 1.2)
    figure = _new_figure(10.0, height)
    axes = figure.subplots(1, 4, sharey=True, gridspec_kw={"width_ratios": [3, 1.2, 1.2, 1.6]})
    ys = list(range(len(rows)))[::-1]
    for y, row in zip(ys, rows):
        psnrs = row.psnrs()
        mean = row.values.get("psnr_mean")
        if _finite(mean):
            axes[0].barh(y, min(float(mean), 200.0), color="#c9d7ea", height=0.6)
        if psnrs:
            axes[0].scatter([min(p, 200.0) for p in psnrs], [y] * len(psnrs), s=14, color="#1f4e8c", zorder=3)
        for ax, key in ((axes[1], "ssim_mean"), (axes[2], "label_accuracy")):
            value = row.values.get(key)
            if _finite(value):
                ax.barh(y, float(value), color="#8fb98f", height=0.6)
                ax.text(min(float(value), 1.0) + 0.02, y, f"{float(value):.2f}", va="center", fontsize=8)
        residual = row.values.get("residual_median")
        if _finite(residual) and residual > 0:
            certified = row.values.get("certified_updates") or 0
            axes[3].scatter([residual], [y], s=30, color="#b5542c" if not certified else "#2c7d3c", zorder=3)
    axes[0].set_yticks(ys, [r.name if len(r.name) <= 28 else r.name[:25] + "..." for r in rows], fontsize=8)
    axes[0].set_xlabel("PSNR (dB): images (dots), mean (bar); clipped at 200", fontsize=8)
    axes[1].set_xlabel("SSIM (mean)", fontsize=8)
    axes[2].set_xlabel("label accuracy", fontsize=8)
    axes[3].set_xlabel("update residual (median; truth-free)\ngreen: some update certified exact", fontsize=8)
    axes[3].set_xscale("log")
    for ax in axes[1:3]:
        ax.set_xlim(0, 1.3)
        ax.set_xticks([0, 0.5, 1])
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def _cells(values: dict[str, Any], lpips: bool) -> list[str]:
    """One run's row of the page: counts, PSNR and residual each folded into one readable cell."""
    from html import escape

    from .report.page import _Num, _fmt

    def count(key: str) -> str:
        value = values.get(key)
        return "" if value is None else str(value)

    images = count("n_images")
    if values.get("n_recovered") is not None and values.get("n_recovered") != values.get("n_images"):
        images = f"{count('n_recovered')} of {images}"
    if values.get("n_exact") is not None:
        images += f" ({count('n_exact')} exact)"
    psnr = _fmt(values.get("psnr_mean"), ".1f")
    if values.get("psnr_min") is not None:
        psnr += (f"<br><span class='note'>median {_fmt(values['psnr_median'], '.1f')}, "
                 f"min {_fmt(values['psnr_min'], '.1f')}</span>")
    residual = _fmt(values.get("residual_median"), ".1e") if values.get("residual_median") is not None else ""
    if values.get("updates"):
        residual += f"<br><span class='note'>{count('certified_updates')} of {count('updates')} certified</span>"
    accuracy = values.get("label_accuracy")
    cells = [escape(str(values[k] or "")) for k in ("run", "attack", "model", "defenses", "data", "threat_model")]
    cells += [_Num(escape(images)), _Num(psnr), _Num(_fmt(values.get("ssim_mean"), ".3f"))]
    cells += [_Num(_fmt(values.get("lpips_mean"), ".3f"))] if lpips else []
    cells += [_Num("n/a" if accuracy is None else f"{100 * float(accuracy):.0f} %"), _Num(residual)]
    return cells


def _page(rows: list[RunRow], stage: Path) -> None:
    from html import escape

    from .report.page import _table, html_page, image_tag

    lpips = any(r.values.get("lpips_mean") is not None for r in rows)
    headers = ["run", "attack", "model", "defenses", "data", "threat", "images", "PSNR (dB)", "SSIM",
               *(["LPIPS"] if lpips else []), "labels", "update residual"]
    table = _table(headers, (_cells(r.values, lpips) for r in rows))
    sections = [f"<section><h2>Runs</h2><div class=\"wide\">{table}</div>"
                "<p class='note'>Images: recovered of the batch, and how many exactly (PSNR &ge; 60 dB); PSNR: the "
                "mean over the recovered images. The update residual needs no ground truth: how well the "
                "reconstruction reproduces the update it came from. comparison.csv holds every column, "
                "per_image.csv every image of every run.</p></section>",
                f"<section><h2>Per image</h2>{image_tag(stage / 'comparison.png', 'per-image PSNR, SSIM, labels')}"
                "</section>"]
    subtitle = escape(f"{len(rows)} run(s): " + ", ".join(r.name for r in rows))
    atomic_write_text(stage / "report.html", html_page("gradleak comparison", subtitle, sections))
