"""``gradleak analyze``, ``list`` and ``version``."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__
from ._common import (DeviceOpt, VerboseOpt, DType, DTypeOpt, Mode, ModelOptionOpt, ModeOpt, WeightsOpt, app, friendly,
                      limited, model_spec, setup_logging, stdout)


def _shape(text: str) -> tuple[int, ...]:
    from ..errors import ConfigError

    parts = text.lower().split("x")
    if not all(p.strip().isdigit() and len(p.strip()) < 10 for p in parts):
        raise ConfigError(f"--input-shape must look like 3x32x32, got {text[:40]!r}")
    return tuple(int(d) for d in parts)


@app.command()
@friendly
def analyze(
    model: str = typer.Option(..., "--model", help="Zoo name (see `gradleak list`) or package.module:factory."),
    input_shape: str = typer.Option("3x32x32", help="One input, CxHxW (a text model: the sequence length, e.g. 32)."),
    batch_size: int = limited("batch", 1, help="Images per client update."),
    num_classes: int = limited("classes", 10, help="Classifier outputs."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    weights: Optional[str] = WeightsOpt,
    device: str = DeviceOpt,
    mode: Optional[Mode] = ModeOpt,
    dtype: DType = DTypeOpt,
    labels_known: bool = typer.Option(True, help="Threat model: the attacker knows the labels."),
    numeric: bool = typer.Option(True, help="Numerical rank/condition of the layer systems (small layers)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    verbose: bool = VerboseOpt,
):
    """From the architecture alone: which attacks apply, and is exact recovery predicted (and why)."""
    from ..analysis import analyze as run_analysis, report_table

    setup_logging(False, verbose)

    shape = _shape(input_shape)
    spec = model_spec(model, model_option, weights, device, mode, dtype, 0, num_classes)
    if spec.modality == "text":   # --input-shape is the sequence length (gradleak.text.analysis)
        _analyze_text(spec, shape, batch_size, num_classes, as_json)
        return
    built = spec.build(shape, num_classes)
    report = run_analysis(built.module, shape, batch_size, loss=built.loss, labels_known=labels_known,
                          numeric=numeric)
    report.model = model
    if as_json:
        print(json.dumps(report.to_json(), indent=2), file=stdout())
        return
    console = Console(file=stdout())
    for table in report_table(report):
        console.print(table)
    for reason in report.reasons:
        console.print(f"- {reason}", highlight=False)


def _analyze_text(spec, shape: tuple[int, ...], batch_size: int, num_classes: int, as_json: bool) -> None:
    from ..errors import ConfigError
    from ..text.analysis import text_malicious, text_report

    if len(shape) != 1:
        raise ConfigError(f"--input-shape: a text model takes the sequence length (e.g. 32), got {shape}")
    built = spec.build(shape, num_classes)
    rows = text_report(built.module, batch_size, shape[0], built.loss)
    malicious = text_malicious(built.module, batch_size, shape[0], built.loss)
    if as_json:
        print(json.dumps({"model": spec.name, "batch_size": batch_size, "length": shape[0], "attacks": rows,
                          "malicious": malicious}, indent=2), file=stdout())
        return
    table = Table(title=f"{spec.label}: {batch_size} sequence(s) of {shape[0]} tokens")
    for column in ("attack", "applies", "exact", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["attack"], "yes" if row["applies"] else "no", "yes" if row["exact"] else "no", row["why"])
    for row in malicious:
        table.add_row(f"{row['attack']} (malicious server)", "yes" if row["applies"] else "no",
                      "yes" if row["exact"] else "no", row["why"])
    Console(file=stdout()).print(table)


@app.command("list")
@friendly
def list_things():
    """The models, attacks and built-in data sets gradleak knows by name."""
    from ..attacks import ATTACKS
    from ..data import BUILTIN_DATASETS
    from ..defenses import DEFENSES
    from ..models import MODELS

    console = Console(file=stdout())
    for title, rows in (
        ("models", [(k, v.description) for k, v in MODELS.items()]),
        ("attacks", [(k, f"{v.paper}. Valid when: {v.conditions}") for k, v in sorted(ATTACKS.items())]),
        ("defenses", [(k, f"[{v.stage}] {v.paper}") for k, v in DEFENSES.items()]),
        ("built-in data", [(k, (v.__doc__ or "").strip().splitlines()[0]) for k, v in BUILTIN_DATASETS.items()]),
    ):
        table = Table(title=title, show_lines=False)
        table.add_column("name")
        table.add_column("description")
        for name, text in rows:
            table.add_row(name, text)
        console.print(table)


@app.command()
@friendly
def version():
    """Print the version."""
    print(__version__, file=stdout())
