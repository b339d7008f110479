"""``gradleak demo``, ``capture``, ``attack`` and ``report``: single runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._io import new_run_dir, output_file, replacing
from ._common import (ClientOpt, DeviceOpt, DType, DTypeOpt, Mode, ModelOptionOpt, ModeOpt, OverwriteOpt, LengthOpt, QuietOpt,
                      VerboseOpt, WeightsOpt, app, client_setup, friendly, limited, model_spec, parse_options, say, setup_logging,
                      stop_if_interrupted, summary)


@app.command()
@friendly
def demo(
    out: Optional[str] = typer.Option(None, help="Run folder to write (default: a new runs/demo-<date>-<time>)."),
    overwrite: bool = OverwriteOpt,
    data: str = typer.Option("photos", help="Built-in data: photos, faces or digits."),
    n: int = limited("images", 8, help="Number of images (one client each)."),
    size: int = limited("side", 32, help="Image side in pixels."),
    model: str = typer.Option("mlp", help="A model whose first layer is fully connected: mlp, two-layer, or yours."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    device: str = DeviceOpt,
    dtype: DType = DTypeOpt,
    seed: int = typer.Option(0, help="Seed of the model initialisation and clients."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """The quick-start job: N clients each share the gradient of one real image; the
    server recovers every image exactly with the closed-form FC-bias inversion and
    writes a grid, curves, metrics and an HTML report."""
    from ..data.request import DataRequest
    from ..pipeline import demo as run_demo

    setup_logging(quiet, verbose)
    spec = model_spec(model, model_option, None, device, None, dtype, seed)
    out_path = new_run_dir("demo", out, overwrite=overwrite)
    with replacing(out_path, overwrite):
        result = run_demo(out_path, data=DataRequest(data, n, size), model=spec, quiet=quiet)
    summary(result, quiet)
    stop_if_interrupted(result)


@app.command()
@friendly
def capture(
    out: str = typer.Option(..., help="Update file to write (.safetensors)."),
    data: str = typer.Option("photos", help="Built-in data name, or a path (image folder, CIFAR batches, MNIST idx)."),
    n: int = limited("batch", 1, help="Number of images in the client's batch."),
    start: int = limited("start", 0, help="Index of the first image."),
    size: Optional[int] = limited("side", 32, help="Image side in pixels (resize)."),
    model: str = typer.Option("mlp", help="Zoo name (see `gradleak list`) or package.module:factory."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    weights: Optional[str] = WeightsOpt,
    device: str = DeviceOpt,
    mode: Optional[Mode] = ModeOpt,
    client: Optional[list[str]] = ClientOpt,
    truth: Optional[str] = typer.Option(None, help="Also write the ground truth (images, labels) here, for evaluation."),
    length: int = LengthOpt,
    overwrite: bool = OverwriteOpt,
    dtype: DType = DTypeOpt,
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Simulate one client on given data and write its update file (and, apart, the ground truth).
    The file records the model (zoo name or factory, options, weights digest) and its mode."""
    from ..data.request import DataRequest
    from ..data.spec import DataSpec
    from ..pipeline import simulate_clients
    from ..runs import save_truth
    from ..update_file import save_update

    setup_logging(quiet, verbose)
    out_path = output_file(out, "--out", overwrite=overwrite)
    truth_path = None if truth is None else output_file(truth, "--truth", overwrite=overwrite)
    spec = model_spec(model, model_option, weights, device, mode, dtype, seed)
    if spec.modality == "text":   # token sequences of real text (gradleak.text), docs/text.md
        from ..text.pipeline import capture_text

        update = capture_text(out_path, data=_text_data(data), n=n, length=length, start=start, model=spec,
                              client=client_setup(client, batch_size=n, seed=seed), truth=truth_path)
        if not quiet:
            say(f"wrote {out} ({update.kind}, batch {update.batch_size} sequences of {length} tokens)")
        return
    dataset = DataRequest(data, n, size, start).load()
    built = spec.build(tuple(dataset.images.shape[1:]), max(len(dataset.classes), 2))
    images = dataset.images.to(device=built.device, dtype=built.dtype)
    setup = client_setup(client, batch_size=n, seed=seed)
    if setup.batch_size != n:
        from ..errors import ConfigError

        raise ConfigError(f"capture writes one client's update, whose batch is the --n {n} images; drop -c batch_size")
    (update,) = simulate_clients(built.module, images, dataset.labels.to(built.device), setup, loss=built.loss,
                                 spec=built.data_spec or DataSpec.from_images(images),
                                 model_description=built.description())
    save_update(update, out_path)
    if truth_path is not None:
        save_truth(truth_path, images.cpu(), dataset.labels)
    if not quiet:
        say(f"wrote {out} ({update.kind}, batch {update.batch_size}, {len(update.tensors)} tensors, "
                        f"{update.mode} mode)")


def _attack_epilog() -> str:
    """Every attack's -o options, one block per attack (click's \\b keeps the lines as written)."""
    import textwrap

    from ..reference._methods import option_lines

    lines = [wrapped for line in option_lines()
             for wrapped in textwrap.wrap(line, 76, initial_indent="  ", subsequent_indent="      ")]
    return ("\b\nAttack options (-o key=value), per attack:\n" + "\n".join(lines)
            + "\n\nTypes, defaults and meanings: docs/reference.md (gradleak reference).")


@app.command(epilog=_attack_epilog())
@friendly
def attack(
    update: Optional[Path] = typer.Argument(None, help="Update file to attack; omit to simulate fresh clients."),
    attack_name: Optional[str] = typer.Option(None, "--attack", "-a", help="Attack name (see `gradleak list`), or "
                                              "auto: the attacks the analyser finds applicable, exact closed forms "
                                              "first, stopping at the first certified exact by the update residual. "
                                              "Default: auto with UPDATE, fc-bias without."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Attack option key=value. Repeatable. "
                                               "With auto: to every attack that takes it, or NAME.key=value to one."),
    out: Optional[str] = typer.Option(None, help="Run folder to write (default: a new runs/attack-<date>-<time>)."),
    overwrite: bool = OverwriteOpt,
    truth: Optional[Path] = typer.Option(None, help="Ground truth file (from `capture --truth`) to score against."),
    labels_known: bool = typer.Option(False, help="Threat model: the attacker is granted the shared labels."),
    data: str = typer.Option("photos", help="Without UPDATE: built-in data name or path."),
    n: int = limited("images", 8, help="Without UPDATE: number of images."),
    start: int = limited("start", 0, help="Without UPDATE: index of the first image (or text sequence), e.g. a "
                         "held-out image of a trained model (training.json's held_out_indices)."),
    size: Optional[int] = limited("side", 32, help="Without UPDATE: image side."),
    client: Optional[list[str]] = ClientOpt,
    model: Optional[str] = typer.Option(None, help="Zoo name or package.module:factory (default mlp; with UPDATE: "
                                                   "the recorded zoo model, required for a factory)."),
    model_option: Optional[list[str]] = ModelOptionOpt,
    weights: Optional[str] = WeightsOpt,
    device: str = DeviceOpt,
    mode: Optional[Mode] = ModeOpt,
    defense: Optional[list[str]] = typer.Option(None, "--defense", "-d", help="Without UPDATE: a client defense, "
                                                "name or name:key=value,key=value (e.g. gaussian:variance=1e-2). "
                                                "Repeatable; applied in order. See `gradleak list`."),
    length: int = LengthOpt,
    dtype: DType = DTypeOpt,
    seed: int = typer.Option(0),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Attack an update file (the model is rebuilt from its record, or from --model and checked
    against it) or freshly simulated clients, score against the ground truth when given, and
    write the run folder. Every run records the update residual: how well the reconstruction
    reproduces the update, without ground truth (certified exact at most 1e4 machine epsilons)."""
    from ..auto import AUTO
    from ..errors import ConfigError

    setup_logging(quiet, verbose)
    options = parse_options(option)
    attack_name = attack_name or (AUTO if update is not None else "fc-bias")
    if attack_name == AUTO and update is None:
        raise ConfigError("--attack auto attacks an update file (UPDATE); name an attack for simulated clients")
    if update is not None and (defense or client or start):
        raise ConfigError("--defense, --client and --start apply to simulated clients; an update file was made "
                          "(and defended, or not) by its client")
    out = new_run_dir("attack", out, overwrite=overwrite)
    threat = _threat(attack_name, labels_known)
    spec = None
    if update is None or model is not None or weights is not None:
        spec = model_spec(model or "mlp", model_option, weights, device, mode, dtype, seed)
    with replacing(out, overwrite):
        if update is not None:
            from ..pipeline import attack_file

            result = attack_file(update, attack_name, out, model=spec, truth=truth, threat=threat, options=options,
                                 quiet=quiet, device=device, dtype=dtype.value)
        else:
            setup = client_setup(client, lr=0.05, seed=seed, share_labels=labels_known)
            result = _attack_clients(attack_name, out, spec, setup, threat, options, defense, quiet,
                                     data=data, n=n, size=size, start=start, length=length)
    summary(result, quiet)
    stop_if_interrupted(result)


def _threat(attack_name: str, labels_known: bool):
    """The threat model of ``gradleak attack``: choosing a malicious-server attack is choosing that server
    (recorded in the run's config)."""
    from ..attacks import MaliciousAttack, get_attack
    from ..auto import AUTO
    from ..threat import ThreatModel

    server = "malicious" if attack_name != AUTO and issubclass(get_attack(attack_name), MaliciousAttack) else "honest"
    return ThreatModel(labels_known=labels_known, server=server)


def _attack_clients(attack_name, out, spec, setup, threat, options, defenses, quiet, *, data, n, size, start, length):
    """``gradleak attack`` without an update file: fresh clients on images, or on text for a text model."""
    if spec.modality == "text":   # token sequences of real text (gradleak.text), docs/text.md
        from ..text.pipeline import attack_text

        return attack_text(attack_name, out, data=_text_data(data), n=n, length=length, start=start, model=spec,
                           client=setup, threat=threat, options=options, defenses=defenses, quiet=quiet)
    from ..data.request import DataRequest
    from ..pipeline import attack_simulated

    return attack_simulated(attack_name, out, data=DataRequest(data, n, size, start), model=spec, client=setup,
                            threat=threat, options=options, defenses=defenses, quiet=quiet)


def _text_data(data: str) -> str:
    """``--data`` for a text model: the image default (photos) means the built-in corpus."""
    return "corpus" if data == "photos" else data


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="A run folder written by demo or attack.")):
    """Rebuild grid.png, curves.png and report.html from a run folder."""
    from ..runs import rebuild_report

    path = rebuild_report(run_dir)
    say(f"wrote {path}")
