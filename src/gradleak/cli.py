"""The ``gradleak`` command: a thin layer over the public functions.

    gradleak demo                     the quick-start job (closed-form attack on real photos)
    gradleak capture ...              simulate a client and write its update file
    gradleak attack [UPDATE] ...      attack an update file, or freshly simulated clients
    gradleak report RUN_DIR           rebuild the pictures and HTML report of a run folder
    gradleak audit CONFIG             defenses x attacks grid, privacy-utility, verdicts
    gradleak list                     models, attacks and built-in data sets
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from ._io import output_dir, output_file
from .errors import GradleakError, one_line

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException
from typer.core import TyperGroup


class _OneLineErrors(TyperGroup):
    """A usage error (a mistyped option, a value of the wrong type, an unknown command) is one
    line on stderr naming the problem and where to look, not click's three-line block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # `gradleak` alone: the help, as asked for
                print(error.ctx.get_help(), file=sys.stderr)
                sys.exit(2)
            ctx = getattr(error, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {one_line(error.format_message())}{where}", file=sys.stderr)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Measure how much private training data leaks from federated-learning updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_err = Console(stderr=True)


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"

    def torch(self):
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[self.value]


class Protocol(str, Enum):
    fedsgd = "fedsgd"
    fedavg = "fedavg"


def _friendly(command):
    """Turn gradleak's own errors, and the file system's, into one line on stderr and exit
    code 2; Ctrl-C into exit code 130 (what was finished is written by the command)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GradleakError as error:
            _err.print(f"error: {one_line(error, 2000)}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(2) from None
        except OSError as error:  # a file system condition the command did not anticipate
            where = f": {error.filename}" if getattr(error, "filename", None) else ""
            _err.print(f"error: {error.strerror or one_line(error)}{where}", highlight=False, soft_wrap=True,
                       markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err.print("interrupted: nothing finished was lost; nothing unfinished was stored", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _stop_if_interrupted(result) -> None:
    """After a run that Ctrl-C cut short and that wrote what it had: say so, exit 130."""
    if result.reconstruction.interrupted:
        _err.print(f"interrupted: wrote the {result.reconstruction.updates} update(s) attacked so far to "
                   f"{result.run_dir}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false), else strings."""
    from .errors import ConfigError

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option expects key=value, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _summary(result, quiet: bool) -> None:
    if quiet:
        return
    s = result.scores.summary if result.scores else {}
    psnr = s.get("psnr_mean")
    line = f"wrote {result.run_dir}/report.html"
    if psnr is not None:
        line += f"  |  PSNR {psnr:.1f} dB (mean of {s.get('n_images')})"
    if s.get("label_accuracy") is not None:
        line += f"  |  label accuracy {100 * s['label_accuracy']:.0f} %"
    Console().print(line, highlight=False, soft_wrap=True)


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries; warnings only.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging.")
ModelOptionOpt = typer.Option(None, "--model-option", "-m", help="Model option key=value (e.g. hidden=256,128). Repeatable.")


@app.command()
@_friendly
def demo(
    out: str = typer.Option("runs/demo", help="Run folder to write."),
    data: str = typer.Option("photos", help="Built-in data: photos, faces or digits."),
    n: int = typer.Option(8, min=1, help="Number of images (one client each)."),
    size: int = typer.Option(32, min=4, max=512, help="Image side in pixels."),
    model: str = typer.Option("mlp", help="Zoo model whose first layer is fully connected: mlp or two-layer."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    dtype: DType = typer.Option(DType.float32, help="Computation precision."),
    seed: int = typer.Option(0, help="Seed of the model initialisation and clients."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """The quick-start job: N clients each share the gradient of one real image; the
    server recovers every image exactly with the closed-form FC-bias inversion and
    writes a grid, curves, metrics and an HTML report."""
    from .pipeline import demo as run_demo

    _logging(quiet, verbose)
    result = run_demo(output_dir(out), data=data, n=n, size=size, model=model, dtype=dtype.torch(), seed=seed, quiet=quiet,
                      model_options=_parse_options(model_option))
    _summary(result, quiet)
    _stop_if_interrupted(result)


def _load_data(data: str, n: int, size: Optional[int], start: int):
    from .data import load_dataset
    from .errors import ConfigError

    dataset = load_dataset(data, size=size, n=start + n)
    if start < 0 or start + n > len(dataset):
        raise ConfigError(f"--start {start} with --n {n} is outside the {len(dataset)} images of {data!r}")
    return dataset.select(list(range(start, start + n)))


@app.command()
@_friendly
def capture(
    out: str = typer.Option(..., help="Update file to write (.safetensors)."),
    data: str = typer.Option("photos", help="Built-in data name, or a path (image folder, CIFAR batches, MNIST idx)."),
    n: int = typer.Option(1, min=1, help="Number of images in the client's batch."),
    start: int = typer.Option(0, min=0, help="Index of the first image."),
    size: Optional[int] = typer.Option(32, min=4, max=512, help="Image side in pixels (resize)."),
    model: str = typer.Option("mlp", help="Zoo model (see `gradleak list`)."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    protocol: Protocol = typer.Option(Protocol.fedsgd, help="fedsgd: share a gradient; fedavg: share a weight delta."),
    lr: float = typer.Option(0.1, min=0.0, help="FedAvg local learning rate."),
    local_steps: Optional[int] = typer.Option(None, min=1, help="FedAvg local SGD steps."),
    epochs: Optional[int] = typer.Option(None, min=1, help="FedAvg local epochs (instead of steps)."),
    local_batch_size: Optional[int] = typer.Option(None, min=1, help="FedAvg minibatch size (default: whole batch)."),
    share_labels: bool = typer.Option(False, help="The client sends its labels with the update."),
    truth: Optional[str] = typer.Option(None, help="Also write the ground truth (images, labels) here, for evaluation."),
    dtype: DType = typer.Option(DType.float32),
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
):
    """Simulate one client on given data and write its update file (and, apart, the ground truth)."""
    from .data.spec import DataSpec
    from .models import MODELS, build_model, model_info
    from .pipeline import ClientSetup, simulate_clients
    from .runs import save_truth
    from .update import save_update

    _logging(quiet, False)
    out_path = output_file(out, "--out")
    truth_path = None if truth is None else output_file(truth, "--truth")
    dataset = _load_data(data, n, size, start)
    images = dataset.images.to(dtype.torch())
    options = _parse_options(model_option)
    if model not in MODELS:
        from .errors import ConfigError

        raise ConfigError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    num_classes = max(len(dataset.classes), 2)
    net = build_model(model, tuple(images.shape[1:]), num_classes, seed=seed, dtype=dtype.torch(), **options)
    setup = ClientSetup(protocol=protocol.value, batch_size=n, lr=lr, local_steps=local_steps, epochs=epochs,
                        local_batch_size=local_batch_size, share_labels=share_labels, seed=seed)
    (update,) = simulate_clients(net, images, dataset.labels, setup, loss=MODELS[model].loss,
                                 spec=DataSpec.from_images(images),
                                 model_description=model_info(model, tuple(images.shape[1:]), num_classes, seed, **options))
    save_update(update, out_path)
    if truth_path is not None:
        save_truth(truth_path, images, dataset.labels)
    if not quiet:
        Console().print(f"wrote {out} ({update.kind}, batch {update.batch_size}, {len(update.tensors)} tensors)")


@app.command()
@_friendly
def attack(
    update: Optional[Path] = typer.Argument(None, help="Update file to attack; omit to simulate fresh clients."),
    attack_name: str = typer.Option("fc-bias", "--attack", "-a", help="Attack name (see `gradleak list`)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Attack option key=value. Repeatable."),
    out: str = typer.Option("runs/attack", help="Run folder to write."),
    truth: Optional[Path] = typer.Option(None, help="Ground truth file (from `capture --truth`) to score against."),
    labels_known: bool = typer.Option(False, help="Threat model: the attacker is granted the shared labels."),
    data: str = typer.Option("photos", help="Without UPDATE: built-in data name or path."),
    n: int = typer.Option(8, min=1, help="Without UPDATE: number of images."),
    size: Optional[int] = typer.Option(32, min=4, max=512, help="Without UPDATE: image side."),
    batch_size: int = typer.Option(1, min=1, help="Without UPDATE: images per client."),
    protocol: Protocol = typer.Option(Protocol.fedsgd, help="Without UPDATE: what clients share."),
    lr: float = typer.Option(0.05, min=0.0, help="Without UPDATE, FedAvg: local learning rate."),
    local_steps: Optional[int] = typer.Option(None, min=1, help="Without UPDATE, FedAvg: local SGD steps."),
    local_batch_size: Optional[int] = typer.Option(None, min=1, help="Without UPDATE, FedAvg: minibatch size."),
    model: str = typer.Option("mlp", help="Without UPDATE: zoo model."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    defense: Optional[list[str]] = typer.Option(None, "--defense", "-d", help="Without UPDATE: a client defense, "
                                                "name or name:key=value,key=value (e.g. gaussian:variance=1e-2). "
                                                "Repeatable; applied in order. See `gradleak list`."),
    dtype: DType = typer.Option(DType.float32),
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Attack an update file (the model is rebuilt from its description and weights) or
    freshly simulated clients, score against the ground truth, and write the run folder."""
    from .pipeline import attack_file, attack_simulated

    _logging(quiet, verbose)
    options = _parse_options(option)
    out = output_dir(out)
    if update is not None:
        if defense:
            from .errors import ConfigError

            raise ConfigError("--defense applies to simulated clients; an update file was defended (or not) by its client")
        result = attack_file(update, attack_name, out, truth=truth, labels_known=labels_known, options=options,
                             dtype=dtype.torch(), quiet=quiet)
    else:
        from .pipeline import ClientSetup

        client = ClientSetup(protocol=protocol.value, batch_size=batch_size, lr=lr, local_steps=local_steps,
                             local_batch_size=local_batch_size, share_labels=labels_known, seed=seed)
        result = attack_simulated(attack_name, out, data=data, n=n, size=size, client=client, model=model,
                                  model_options=_parse_options(model_option), labels_known=labels_known,
                                  options=options, dtype=dtype.torch(), seed=seed, quiet=quiet, defenses=defense)
    _summary(result, quiet)
    _stop_if_interrupted(result)


@app.command()
@_friendly
def report(run_dir: Path = typer.Argument(..., help="A run folder written by demo or attack.")):
    """Rebuild grid.png, curves.png and report.html from a run folder."""
    from .runs import rebuild_report

    path = rebuild_report(run_dir)
    Console().print(f"wrote {path}")


@app.command()
@_friendly
def analyze(
    model: str = typer.Option(..., "--model", help="Zoo name (see `gradleak list`) or package.module:factory."),
    input_shape: str = typer.Option("3x32x32", help="One input, CxHxW."),
    batch_size: int = typer.Option(1, min=1, help="Images per client update."),
    num_classes: int = typer.Option(10, min=1),
    model_option: Optional[list[str]] = ModelOptionOpt,
    labels_known: bool = typer.Option(True, help="Threat model: the attacker knows the labels."),
    numeric: bool = typer.Option(True, help="Numerical rank/condition of the layer systems (small layers)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
):
    """From the architecture alone: which attacks apply, and is exact recovery predicted (and why)."""
    from .analysis import analyze as run_analysis, load_model_spec, report_table
    from .errors import ConfigError

    parts = input_shape.lower().split("x")
    if not all(p.strip().isdigit() and len(p.strip()) < 10 for p in parts):
        raise ConfigError(f"--input-shape must look like 3x32x32, got {input_shape[:40]!r}")
    shape = tuple(int(d) for d in parts)
    net, loss = load_model_spec(model, shape, num_classes, **_parse_options(model_option))
    report = run_analysis(net, shape, batch_size, loss=loss, labels_known=labels_known, numeric=numeric)
    report.model = model
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    console = Console()
    for table in report_table(report):
        console.print(table)
    for reason in report.reasons:
        console.print(f"- {reason}", highlight=False)


@app.command()
@_friendly
def audit(
    config: Path = typer.Argument(..., help="Audit config, YAML or TOML (see gradleak.audit.config)."),
    out: Optional[str] = typer.Option(None, help="Audit folder (default: runs/audit-<config name>)."),
    fresh: bool = typer.Option(False, "--fresh", help="Recompute every cell instead of continuing a stored audit."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Run a grid of models x attacks x defenses x batch sizes on real images, train each
    defense federatedly for its accuracy cost, and write one report with verdicts.
    Finished cells are stored as they finish: run the same command again to continue."""
    from .audit import load_audit_config, run_audit

    _logging(quiet, verbose)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    cfg = load_audit_config(config)
    folder = output_dir(Path("runs") / f"audit-{config.stem}" if out is None else out)
    result = run_audit(cfg, folder, quiet=quiet, resume=not fresh)
    if not quiet:
        console = Console()
        for verdict in result.verdicts:
            console.print(f"[{verdict['level']}] {verdict['text']}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"wrote {result.report}", highlight=False)
    if result.interrupted:
        _err.print(f"interrupted: {len(result.cells)} finished cell(s) are stored "
                   f"in {folder}; run the same command again to continue", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)


@app.command("list")
def list_things():
    """The models, attacks and built-in data sets gradleak knows by name."""
    from .attacks import ATTACKS
    from .data import BUILTIN_DATASETS
    from .defenses import DEFENSES
    from .models import MODELS

    console = Console()
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


study_app = typer.Typer(help="Experiments from the literature, reproduced end to end.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(study_app, name="study")


@study_app.command("architectures")
@_friendly
def study_architectures(
    out: str = typer.Option("runs/architectures", help="Folder for mse.png, strip.png, table.json, report.html."),
    steps: int = typer.Option(10, min=1, help="L-BFGS steps per model (seed 004 used 300: hours on a CPU)."),
    inner: int = typer.Option(4, min=1, help="Function evaluations per L-BFGS step (DLG used 20)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Restrict to these models (repeatable)."),
    image: int = typer.Option(1, min=0, max=9, help="Index of the built-in photo to attack."),
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
):
    """Seed 004: DLG on sigmoid LeNet (32 px), ResNet-18 and DenseNet-121 (224 px) and
    Inception-v3 (299 px), the same image; MSE vs. step, the image's evolution, a table."""
    from .studies import ARCHITECTURES, architecture_study

    _logging(quiet, False)
    out = output_dir(out)
    results = architecture_study(out, steps=steps, inner=inner, models=model or tuple(ARCHITECTURES), image=image,
                                 seed=seed, quiet=quiet)
    if not quiet:
        table = Table(title=f"DLG, {steps} L-BFGS steps x {inner} evaluations")
        for column in ("model", "px", "parameters", "MSE start", "MSE final", "PSNR (dB)", "seconds"):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(r.model, str(r.pixels), f"{r.parameters:,}", f"{r.mse_start:.4g}", f"{r.mse_final:.4g}",
                          f"{r.psnr_final:.1f}", f"{r.seconds:.0f}")
        Console().print(table)
        Console().print(f"wrote {out}/report.html")
    if results and results[-1].interrupted:
        _err.print(f"interrupted: wrote the {len(results)} model(s) run so far to {out}",
                   highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)


@app.command()
def version():
    """Print the version."""
    print(__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
