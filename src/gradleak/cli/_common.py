"""What every ``gradleak`` command shares: the app, one-line errors, Ctrl-C, option parsing,
and the options that name a model (one :class:`~gradleak.models.ModelSpec` per command)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import sys
from contextvars import ContextVar
from enum import Enum
from typing import Any, Optional

import typer
from rich.console import Console

from ..errors import ConfigError, GradleakError, one_line

try:  # typer >= 0.20 vendors click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException
from typer.core import TyperCommand, TyperGroup

err = Console(stderr=True, emoji=False)


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


class _Command(TyperCommand):
    """Plain-text help without typer's HTML-export escapes: typer writes ``\\[default: 32]`` into
    every option's help whenever rich is installed, even with ``rich_markup_mode=None``."""

    def format_help(self, ctx, formatter) -> None:
        super().format_help(ctx, formatter)
        formatter.buffer[:] = [text.replace("\\[", "[") for text in formatter.buffer]


class App(typer.Typer):
    """The ``gradleak`` typer app: every command gets :class:`_Command` (plain help)."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = App(
    cls=_OneLineErrors,
    help="Measure how much private training data leaks from federated-learning updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Mode(str, Enum):
    train = "train"
    eval = "eval"


_STDOUT: ContextVar[Any] = ContextVar("gradleak_stdout", default=None)
INTERNAL_ERROR = 70   # EX_SOFTWARE: something failed that gradleak did not anticipate (a bug, or user code)


def stdout():
    """The stream a command's own output goes to (JSON, Markdown, tables, 'wrote ...' lines).
    While a command runs, ``sys.stdout`` is stderr, so that a ``print()`` in the user's model
    factory, a library's chatter or a stray message never mixes with machine-readable output."""
    return _STDOUT.get() or sys.stdout


def say(*objects: Any, **options: Any) -> None:
    """Print to the command's output (see :func:`stdout`) with rich, no markup or highlighting."""
    Console(file=stdout(), emoji=False, highlight=False, soft_wrap=True).print(*objects, **options)


def _unexpected(command: str, error: BaseException, verbose: bool, can_verbose: bool) -> None:
    """One line for what nothing else caught: an exception, ``SystemExit`` or ``GeneratorExit``
    raised by the user's code (a factory, a model's forward) or a bug; the traceback with --verbose."""
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    what = (f"something called sys.exit({error.code!r})" if isinstance(error, SystemExit)
            else f"{type(error).__name__}: {one_line(error, 300) or '(no message)'}")
    hint = " (--verbose shows the traceback)" if can_verbose and not verbose else ""
    err.print(f"error: gradleak {command} stopped: {what}; nothing unfinished was stored{hint}",
              highlight=False, soft_wrap=True, markup=False)


def friendly(command):
    """Every command's guard. gradleak's own errors and the file system's: one line on stderr,
    exit code 2. Ctrl-C: exit code 130 (what was finished is written by the command). Anything
    else (an unexpected exception, or ``SystemExit``/``GeneratorExit`` from the user's code):
    one line naming it, exit code 70, the traceback only with ``--verbose``. While the command
    runs, stray ``print()`` output goes to stderr (:func:`stdout`)."""
    name = command.__name__.replace("_", "-")
    can_verbose = "verbose" in inspect.signature(command).parameters

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        token = _STDOUT.set(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return command(*args, **kwargs)
        except GradleakError as error:
            err.print(f"error: {one_line(error, 2000)}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(2) from None
        except OSError as error:  # a file system condition the command did not anticipate
            where = f": {error.filename}" if getattr(error, "filename", None) else ""
            err.print(f"error: {error.strerror or one_line(error)}{where}", highlight=False, soft_wrap=True,
                      markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing finished was lost; nothing unfinished was stored", highlight=False)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except (Exception, SystemExit, GeneratorExit) as error:  # noqa: BLE001 - the last line of defence
            _unexpected(name, error, bool(kwargs.get("verbose")), can_verbose)
            raise typer.Exit(INTERNAL_ERROR) from None
        finally:
            _STDOUT.reset(token)

    return wrapper


def stop_if_interrupted(result) -> None:
    """After a run that Ctrl-C cut short and that wrote what it had: say so, exit 130."""
    if result.reconstruction.interrupted:
        err.print(f"interrupted: wrote the {result.reconstruction.updates} update(s) attacked so far to "
                  f"{result.run_dir}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)


def parse_options(pairs: list[str] | None, option: str = "--option") -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false), else strings."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects key=value, got {pair[:80]!r}")
        try:
            options[key.strip()] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            options[key.strip()] = value
    return options


def setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _recorded_defenses(run_dir) -> str:
    """The defenses a run folder's config.json records, as one label ('' when none were applied)."""
    from ..defenses import stack_label

    try:
        described = json.loads((run_dir / "config.json").read_text()).get("defenses")
    except (OSError, ValueError, AttributeError):
        return ""
    return stack_label(described) if described else ""


def summary(result, quiet: bool) -> None:
    if quiet:
        return
    from ..metrics import recovery_counts

    s = result.scores.summary if result.scores else {}
    psnr = s.get("psnr_mean")
    line = f"wrote {result.run_dir}/report.html"
    if s.get("rouge1") is not None:   # a text run (gradleak.text.runs)
        line += (f"  |  ROUGE-1 {100 * s['rouge1']:.1f} %, ROUGE-2 {100 * s['rouge2']:.1f} %, exact sequences "
                 f"{100 * s['exact_rate']:.0f} % (of {s['n_sequences']})")
    defenses = _recorded_defenses(result.run_dir)
    if defenses:
        line += f"  |  defense: {defenses}"
    if psnr is not None:
        n, got = s.get("n_images"), s.get("n_recovered")
        if got is None:
            counted = f"mean of {n}"
        elif got == n:
            counted = f"mean of {n}; {s.get('n_exact')} exact"
        else:
            counted = f"mean of the {got} recovered; {recovery_counts(s)}"
        line += f"  |  PSNR {psnr:.1f} dB ({counted})"
    if getattr(result, "residuals", None):
        from ..residual import carried_text, residual_summary, summary_text
        from ..shares import mixture_parts, parts_text

        recorded = residual_summary(result.residuals)
        parts = mixture_parts(getattr(getattr(result, "reconstruction", None), "notes", None) or [], None)
        carried = parts_text(parts) if parts is not None else carried_text(recorded)   # a fitted mixture: its parts
        line += f"  |  {summary_text(recorded)} (truth-free)" + (f"  |  {carried}" if carried else "")
    if s.get("label_accuracy") is not None:
        line += f"  |  label accuracy {100 * s['label_accuracy']:.0f} %"
    say(line)


def model_spec(model: str, model_option: Optional[list[str]], weights: Optional[str], device: str,
               mode: Optional[Mode], dtype: DType, seed: int, num_classes: Optional[int] = None):
    """The one :class:`~gradleak.models.ModelSpec` a command's model options describe."""
    from ..models import ModelSpec

    return ModelSpec(model, parse_options(model_option, "--model-option"), weights=weights or None, device=device,
                     mode=(mode or Mode.train).value, dtype=dtype.value, seed=seed, num_classes=num_classes)


def client_setup(pairs: Optional[list[str]], **defaults: Any):
    """A :class:`~gradleak.client.ClientSetup` from ``--client key=value`` pairs over ``defaults``."""
    from ..client import ClientSetup

    values = {**defaults, **parse_options(pairs, "--client")}
    try:
        return ClientSetup(**values)
    except TypeError as error:
        known = ", ".join(f.name for f in ClientSetup.__dataclass_fields__.values())
        raise ConfigError(f"--client: {one_line(error)}; keys: {known}") from None


def limited(key: str, default: Any, *decls: str, help: str) -> Any:
    """A typer option bounded by the one table of limits (:data:`gradleak.limits.LIMITS`): every
    command's ``--size``, ``--n``, ``--epochs``... shares the bound of its config key and function."""
    from ..limits import LIMITS

    bound = LIMITS[key]
    return typer.Option(default, *decls, min=bound.low, max=bound.high, help=help)


OverwriteOpt = typer.Option(False, "--overwrite", help="Replace the results already in --out (only a gradleak "
                                                        "result folder or file is ever replaced).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries; warnings only.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging.")
ModelOptionOpt = typer.Option(None, "--model-option", "-m",
                              help="Model option key=value (e.g. hidden=256,128); for a factory, its keyword "
                                   "arguments. Repeatable.")
WeightsOpt = typer.Option(None, "--weights", help="Weights file: safetensors, or a PyTorch state dict (.pt/.pth, "
                                                  "read with weights_only=True).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")
ModeOpt = typer.Option(None, "--mode", help="train: BatchNorm uses the batch's statistics, as a training client "
                                            "does (default); eval: running statistics.")
DTypeOpt = typer.Option(DType.float32, "--dtype", help="Computation precision.")
LengthOpt = typer.Option(16, "--length", min=2, max=4096, help="Text models: tokens per sequence (--data corpus, "
                                                               "the default for them, or a text file, one per line).")
ClientOpt = typer.Option(None, "--client", "-c", help="Client setting key=value: protocol=fedsgd|fedavg, "
                                                      "batch_size, lr, local_steps, epochs, local_batch_size. "
                                                      "Repeatable.")
