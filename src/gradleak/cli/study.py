"""``gradleak study ...``: experiments from the literature, reproduced end to end."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .._io import new_run_dir, replacing
from ._common import App, DeviceOpt, OverwriteOpt, QuietOpt, VerboseOpt, app, err, friendly, limited, say, setup_logging, stdout

study_app = App(help="Experiments from the literature, reproduced end to end.", no_args_is_help=True,
              rich_markup_mode=None)
app.add_typer(study_app, name="study")


@study_app.command("architectures")
@friendly
def study_architectures(
    out: Optional[str] = typer.Option(None, help="Folder for mse.png, strip.png, table.json, report.html (default: a "
                                                 "new runs/architectures-<date>-<time>)."),
    overwrite: bool = OverwriteOpt,
    steps: int = limited("steps", 300, help="L-BFGS steps per model (seed 004: 300)."),
    inner: int = limited("steps", 20, help="Function evaluations per L-BFGS step (DLG: 20)."),
    minutes: Optional[float] = typer.Option(15.0, min=0.01, help="Time budget per model, minutes (the 224/299-px "
                                                                  "models need hours for 300 x 20 on a CPU)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Restrict to these models (repeatable)."),
    image: int = typer.Option(1, min=0, max=9, help="Index of the built-in photo to attack."),
    device: str = DeviceOpt,
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Seed 004: DLG on sigmoid LeNet (32 px), ResNet-18 and DenseNet-121 (224 px) and
    Inception-v3 (299 px), the same image; MSE vs. step, the image's evolution, a table."""
    from ..studies import ARCHITECTURES, architecture_study

    setup_logging(quiet, verbose)
    out = new_run_dir("architectures", out, overwrite=overwrite)
    with replacing(out, overwrite):
        results = architecture_study(out, steps=steps, inner=inner, models=model or tuple(ARCHITECTURES),
                                     image=image, seed=seed, quiet=quiet, device=device,
                                     time_budget=None if minutes is None else 60 * minutes)
    if not quiet:
        table = Table(title=f"DLG, {steps} L-BFGS steps x {inner} evaluations")
        for column in ("model", "px", "parameters", "steps", "MSE start", "MSE final", "PSNR (dB)", "seconds"):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(r.model, str(r.pixels), f"{r.parameters:,}", str(r.steps_run), f"{r.mse_start:.4g}",
                          f"{r.mse_final:.4g}", f"{r.psnr_final:.1f}", f"{r.seconds:.0f}")
        Console(file=stdout()).print(table)
        say(f"wrote {out}/report.html")
    if results and results[-1].interrupted:
        err.print(f"interrupted: wrote the {len(results)} model(s) run so far to {out}",
                  highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)
