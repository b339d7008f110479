"""``gradleak compare``: several run folders side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._io import new_run_dir, replacing
from ._common import OverwriteOpt, QuietOpt, app, friendly, say


@app.command()
@friendly
def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders written by demo, attack or an audit's cells/."),
    out: Optional[str] = typer.Option(None, help="Folder to write report.html, comparison.csv, per_image.csv and "
                                                 "comparison.png (default: a new runs/compare-<date>-<time>)."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
):
    """Put run folders side by side: one table (attack, model, defenses, images recovered, PSNR,
    SSIM, LPIPS, label accuracy, update residual), per-image PSNR in one figure, and CSV files."""
    from ..compare import compare_runs

    out_path = new_run_dir("compare", out, overwrite=overwrite)
    with replacing(out_path, overwrite):
        result = compare_runs(runs, out_path)
    if not quiet:
        say(f"wrote {result.report} and {result.csv} ({len(result.rows)} runs)")
