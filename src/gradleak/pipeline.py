"""The end-to-end pass as functions: simulate clients, attack their updates, write a run.

These are the public functions the CLI is a thin layer over; each is usable from a
notebook. :func:`demo` is the quick-start main job.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from torch import nn

from .attacks.base import Attack, Reconstruction
from .attacks.malicious import MaliciousAttack
from .client import ClientSetup
from .data.request import DataRequest
from .data.spec import DataSpec
from .errors import AttackNotApplicable, ConfigError, GradleakError, one_line
from .models import ModelSpec
from .residual import Residual, reconstruction_residual
from .runs import RunResult, write_run
from .update import SharedUpdate

__all__ = ["ClientSetup", "ModelSpec", "DataRequest", "simulate_clients", "attack_updates", "reconstruct_each",
           "attack_with_residuals", "attack_auto", "attack_simulated", "attack_file", "model_for_update",
           "demo", "progress_bar", "psnr_monitor", "make_attack"]

log = logging.getLogger(__name__)


def progress_bar(quiet: bool = False) -> Progress:
    """A rich progress bar on stderr (disabled when ``quiet``): what is done of what, the time
    elapsed and the estimated time left (from the pace so far, once a first step is done)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True), disable=quiet,
                    transient=False)


def simulate_clients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup | None = None,
                     *, loss: str = "cross_entropy", spec: DataSpec | None = None,
                     model_description: dict | None = None, defenses: Any = None) -> list[SharedUpdate]:
    """Split the images into consecutive client batches of ``setup.batch_size`` and return
    each update as the server sees it (after ``defenses``, see :mod:`gradleak.defenses`)."""
    from .defenses import defended_updates

    return [d.update for d in defended_updates(model, images, labels, setup, defenses, loss=loss, spec=spec,
                                               model_info=model_description)]


def psnr_monitor(truth: torch.Tensor):
    """A monitor for iterative attacks: mean PSNR of the current images against ``truth``
    after matching. It lives on the evaluation side: the attack only sees the numbers it
    returns go into the history, never the images."""
    from .metrics import match, psnr

    def monitor(images: torch.Tensor) -> dict[str, float]:
        perm = match(images, truth)
        return {"psnr": float(psnr(images[perm], truth).mean())}

    return monitor


def attack_updates(attack: Attack, updates: Sequence[SharedUpdate], *, truths: Sequence[torch.Tensor] | None = None,
                   quiet: bool = False, progress: Progress | None = None) -> Reconstruction:
    """Attack each update and join the results (``attack.reconstruct_many``: gradient matching
    runs updates of the same model and shapes together in one batched computation).

    ``truths`` (one image batch per update, optional) only feeds :func:`psnr_monitor`, so
    the curves show PSNR over iterations. Interrupting (Ctrl-C) stops the whole call and
    keeps what was reconstructed so far (for an iterative attack, the best iterate of the
    update it was working on): the result is marked ``interrupted``, with a note saying how
    many updates it covers. Ctrl-C before the first result re-raises KeyboardInterrupt.
    ``progress``: a running rich ``Progress`` to add the bars to (default: a new one,
    unless ``quiet``).
    """
    parts, interrupted = reconstruct_each(attack, updates, truths=truths, quiet=quiet, progress=progress)
    return joined(parts, interrupted, len(updates))


def joined(parts: list[Reconstruction], interrupted: bool, attacked: int) -> Reconstruction:
    """The reconstructions of :func:`reconstruct_each` joined into one, noting an interruption
    (``attacked``: how many updates were to be attacked)."""
    result = Reconstruction.concat(parts)
    result.interrupted = result.interrupted or interrupted
    if result.interrupted:
        cut = sum(part.interrupted for part in parts)
        partly = "" if not cut else " (the last one partly)" if cut == 1 else f" (the last {cut} partly, attacked together)"
        result.notes.append(f"interrupted: {len(parts)} of {attacked} updates attacked{partly}")
        log.warning("interrupted: kept %d of %d updates%s", len(parts), attacked, partly)
    return result


def attack_with_residuals(attack: Attack, updates: Sequence[SharedUpdate], *,
                          truths: Sequence[torch.Tensor] | None = None, quiet: bool = False,
                          progress: Progress | None = None) -> tuple[Reconstruction, list[Residual]]:
    """:func:`attack_updates`, and the update residual of each update's reconstruction
    (:func:`gradleak.residual.reconstruction_residual`: the truth-free measure, computed on
    the update as the attack's threat model lets the server see it); one residual per update
    attacked (fewer after Ctrl-C)."""
    parts, interrupted = reconstruct_each(attack, updates, truths=truths, quiet=quiet, progress=progress)
    residuals = [reconstruction_residual(attack.model, update, part, attack.threat)
                 for update, part in zip(updates, parts)]
    return joined(parts, interrupted, len(updates)), residuals


def reconstruct_each(attack: Attack, updates: Sequence[SharedUpdate], *, truths: Sequence[torch.Tensor] | None = None,
                     quiet: bool = False, progress: Progress | None = None) -> tuple[list[Reconstruction], bool]:
    """One :class:`Reconstruction` per update, in order, with progress bars, and whether Ctrl-C
    cut the call short (then the list holds what was finished, the last parts possibly
    marked ``interrupted``). :func:`attack_updates` joins them; an audit splits them among
    the cells whose updates were attacked together. Arguments as :func:`attack_updates`."""
    if not updates:
        raise ConfigError("no updates to attack")
    parts: list[Reconstruction] = []
    own = progress is None
    progress = progress_bar(quiet) if own else progress
    interrupted = False
    with progress if own else contextlib.nullcontext():
        task = progress.add_task(f"{attack.name} on {len(updates)} update(s)", total=len(updates))
        steps = progress.add_task("  iterations", total=None, visible=False)

        def advance(done: int, total: int) -> None:
            progress.update(steps, completed=done, total=total, visible=True)

        monitors = None if truths is None else [psnr_monitor(truth) for truth in truths]
        try:
            for part in attack.reconstruct_many(updates, monitors=monitors, progress=advance):
                parts.append(part)  # after Ctrl-C: the parts it cut short (one, or a batched chunk), then no more
                progress.advance(task)
        except KeyboardInterrupt:
            if not parts:
                raise
            interrupted = True
        finally:
            if not own:
                progress.remove_task(task)
                progress.remove_task(steps)
    return parts, interrupted


def make_attack(name: str, model: nn.Module, threat, options: dict[str, Any]) -> Attack:
    from .attacks import get_attack

    cls = get_attack(name)
    try:
        return cls(model, threat, **options)
    except TypeError as error:
        raise ConfigError(f"attack {name!r}: bad option ({error}); see help(gradleak.attacks.{cls.__name__})") from None


def _model_spec(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(model)


def _data_request(data: DataRequest | str) -> DataRequest:
    return data if isinstance(data, DataRequest) else DataRequest(data)


def attack_simulated(attack: str, out: str | Path, *, data: DataRequest | str = "photos",
                     model: ModelSpec | str = "mlp", client: ClientSetup | None = None, threat: Any = None,
                     options: dict[str, Any] | None = None, defenses: Any = None, quiet: bool = False,
                     save_updates: bool = False) -> RunResult:
    """Simulate clients on real data (``data``: a :class:`~gradleak.data.request.DataRequest`
    or a built-in name) training ``model`` (a :class:`~gradleak.models.ModelSpec` or a zoo
    name: options, weights, device, mode, dtype, seed) as ``client`` says (FedSGD, batch 1 by
    default), defended by ``defenses`` (specs or :class:`~gradleak.defenses.Defense`
    objects); attack each update as the server sees it under ``threat`` (default: an
    honest-but-curious server that is not granted the labels) with ``attack`` and its
    ``options``; score against the ground truth and write the run folder ``out``."""
    from .defenses import defended_updates, make_defenses
    from .threat import ThreatModel

    request, spec = _data_request(data), _model_spec(model)
    dataset = request.load()
    built = spec.build(tuple(dataset.images.shape[1:]), len(dataset.classes))
    if built.loss == "binary_cross_entropy" and len(dataset.classes) != 2:
        raise ConfigError(f"model {spec.name!r} is a binary classifier, but data {str(request.name)!r} has "
                          f"{len(dataset.classes)} classes; use binary data (e.g. faces) or another model")
    images = dataset.images.to(device=built.device, dtype=built.dtype)
    labels = dataset.labels.to(built.device)
    data_spec = built.data_spec or DataSpec.from_images(images)   # trained weights bring their normalization
    setup = client or ClientSetup(seed=spec.seed)
    stack = make_defenses(defenses)
    threat = threat or ThreatModel(labels_known=setup.share_labels)
    attacker = make_attack(attack, built.module, threat, dict(options or {}))
    sent, description = built.module, built.description()
    if isinstance(attacker, MaliciousAttack):  # the clients train on the model the server sends
        public = public_images(request, built, data_spec)
        sent, description = attacker.serve(built.module, tuple(images.shape[1:]), public), None
    served = defended_updates(sent, images, labels, setup, stack, loss=built.loss, spec=data_spec,
                              model_info=description)
    updates = [d.update for d in served]
    out = Path(out)
    truths = [images[d.indices] for d in served]
    reconstruction, residuals = attack_with_residuals(attacker, updates, truths=truths, quiet=quiet)
    kept = [i for d in served[: reconstruction.updates] for i in d.indices]  # fewer if interrupted
    config = {"data": {**request.to_json(), "classes": list(dataset.classes)}, "model": built.description(),
              "model_spec": spec.to_json(), "device": str(built.device), "mode": spec.mode,
              "dtype": spec.dtype, "client": setup.to_json(), "data_spec": data_spec.to_json(),
              "threat": threat.to_json(), "threat_model": threat.sok(attacker), "defenses": [d.describe() for d in stack],
              "privacy": [d.privacy for d in served if d.privacy]}
    return write_run(out, reconstruction, originals=images[kept], true_labels=labels[kept], config=config,
                     residuals=residuals, updates=updates if save_updates else ())


def public_images(request: DataRequest, built, data_spec: DataSpec) -> torch.Tensor | None:
    """What a malicious server knows of the data: other images of the same source (after the
    attacked ones, up to 64), normalized as the clients normalize; None when there are none."""
    from .data import load_dataset
    from .errors import GradleakError

    try:
        rest = load_dataset(request.name, size=request.size, n=None)
    except GradleakError:
        return None
    first = request.start + (request.n or len(rest))
    if len(rest) - first < 2:
        return None
    images = rest.images[first:first + 64].to(device=built.device, dtype=built.dtype)
    return data_spec.normalize(images)


def model_for_update(update: SharedUpdate, model: ModelSpec | str | None, where: str | Path, **overrides: Any):
    """The model an update was made with: the user's spec when given (checked against what
    the update recorded: name, options, shape, classes, weights digest), else the recorded
    zoo model. A recorded factory is never imported because a file names it."""
    from .models import check_recorded
    from .names import is_factory

    recorded = update.model
    if model is None:
        if recorded is None:
            raise ConfigError(f"{where} does not say which model made it; pass --model (a zoo name or "
                              "package.module:factory) and --weights")
        if is_factory(str(recorded["name"])):
            raise ConfigError(f"{where} was made with the user model {recorded['name']!r}; gradleak never imports "
                              f"code named by a file: pass --model {recorded['name']} (and its --model-option values)")
        spec = ModelSpec.from_description(recorded, **overrides)
    else:
        spec = _model_spec(model).with_(**overrides) if overrides else _model_spec(model)
    if update.input_shape is None:
        raise ConfigError(f"{where} does not record its input shape")
    classes = recorded.get("num_classes") if recorded else None
    built = spec.build(update.input_shape, classes)
    if recorded is not None:
        check_recorded(recorded, built, str(where))
        if recorded.get("weights_sha256") and update.weights is None and built.weights_sha256 is None:
            raise ConfigError(f"{where} was made from a weights file (SHA-256 {recorded['weights_sha256'][:12]}...) "
                              "and does not carry the weights of its round: pass --weights")
    return built


def _attack_text_update(update, update_path, attack: str, out, *, model=None, truth=None, threat=None, options=None,
                        quiet: bool = False, device: str = "auto", dtype: str = "float32"):
    """:func:`attack_file` for a text update (``extra["text"]``): the run folder of
    :mod:`gradleak.text.runs`, scored against ``truth`` (``capture --truth``) when given."""
    from .text.corpus import load_tokenizer
    from .text.runs import load_text_truth, write_text_run
    from .threat import ThreatModel

    overrides: dict[str, Any] = {} if model is not None else {"device": device, "dtype": dtype}
    built = model_for_update(update, model, update_path, **overrides)
    update = update.validate_for(built.module).to(dtype=built.dtype, device=built.device)
    threat = threat or ThreatModel()
    attacker = make_attack(attack, built.module, threat, dict(options or {}))
    reconstruction, residuals = attack_with_residuals(attacker, [update], quiet=quiet)
    config = {"update_file": str(update_path), "model": built.description(),
              "update": {k: v for k, v in update.metadata().items() if k not in ("parameters", "model")},
              "threat": threat.to_json(), "threat_model": threat.sok(attacker)}
    return write_text_run(out, reconstruction, truth=None if truth is None else load_text_truth(truth),
                          tokenizer=load_tokenizer(), config=config, residuals=residuals)


def attack_file(update_path: str | Path, attack: str, out: str | Path, *, model: ModelSpec | str | None = None,
                truth: str | Path | None = None, threat: Any = None, options: dict[str, Any] | None = None,
                quiet: bool = False, device: str = "auto", dtype: str = "float32") -> RunResult:
    """Attack an update file. ``model``: the spec to rebuild it with (required for a user's
    factory, and checked against what the update recorded); without it the recorded zoo
    model is rebuilt on ``device`` in ``dtype``. The model runs in the mode the update records.
    ``attack="auto"``: the attacks the analyser finds applicable, exact closed forms first,
    stopping at the first certified exact (:func:`attack_auto`); the run folder holds the
    reconstruction chosen and ``metrics.json["auto"]`` every attempt. ``metrics.json`` records
    the update residual (truth-free) either way."""
    from .auto import AUTO
    from .runs import load_truth
    from .threat import ThreatModel
    from .update_file import load_update

    update = load_update(update_path)
    if isinstance(update.extra.get("text"), dict):   # a text client's update: gradleak.text
        return _attack_text_update(update, update_path, attack, out, model=model, truth=truth, threat=threat,
                                   options=options, quiet=quiet, device=device, dtype=dtype)
    overrides: dict[str, Any] = {} if model is not None else {"device": device, "dtype": dtype}
    if update.mode is not None:
        overrides["mode"] = update.mode
    built = model_for_update(update, model, update_path, **overrides)
    update = update.validate_for(built.module).to(dtype=built.dtype, device=built.device)
    if update.model is None and update.loss != built.loss:
        raise ConfigError(f"{update_path}: the update says loss {update.loss!r}, but the model trains with {built.loss!r}")
    threat = threat or ThreatModel()
    originals = true_labels = None
    if truth is not None:
        originals, true_labels = load_truth(truth)
        originals, true_labels = originals.to(device=built.device, dtype=built.dtype), true_labels.to(built.device)
    truths = None if originals is None else [originals]
    extra: dict[str, Any] = {}
    if attack == AUTO:
        reconstruction, residual, attempts, why = attack_auto(built.module, update, threat, num_classes=built.num_classes,
                                                              options=options, truths=truths, quiet=quiet)
        extra["auto"] = {"plan": why, "attempts": [a.to_json() for a in attempts]}
        if reconstruction is None:
            raise AttackNotApplicable("attacks='auto': no attack recovered anything from " f"{update_path}: " + "; ".join(
                f"{a.attack}: {a.status} ({a.message})" for a in attempts) if attempts else f"attacks='auto': {why}",
                condition="an attack the analyser finds applicable")
        residuals = [residual]
        attacker = make_attack(reconstruction.attack, built.module, threat, {})
    else:
        attacker = make_attack(attack, built.module, threat, dict(options or {}))
        reconstruction, residuals = attack_with_residuals(attacker, [update], truths=truths, quiet=quiet)
    config = {"update_file": str(update_path), "model": built.description(), "device": str(built.device),
              "update": {k: v for k, v in update.metadata().items() if k not in ("parameters", "model")},
              "threat": threat.to_json(), "threat_model": threat.sok(attacker)}
    return write_run(out, reconstruction, originals=originals, true_labels=true_labels, config=config,
                     residuals=residuals, extra_metrics=extra)


def attack_auto(model: nn.Module, update: SharedUpdate, threat, *, num_classes: int,
                options: dict[str, Any] | None = None, truths: Sequence[torch.Tensor] | None = None,
                quiet: bool = False, plan=None) -> tuple[Reconstruction | None, Residual | None, list, str]:
    """``attacks="auto"`` on one update: the plan of :func:`gradleak.auto.plan_attacks` (or
    ``plan``) run in order, stopping at the first reconstruction certified exact by its update
    residual (or at Ctrl-C). Returns the reconstruction with the best residual (certified
    first, then the lowest; None when no attack recovered an image), its residual, every
    attempt and the plan's reason. ``truths`` feeds only the PSNR curves."""
    import time

    from .auto import AutoAttempt, better_residual, plan_attacks

    why = "the plan given"
    if plan is None:
        plan, why = plan_attacks(model, threat.observe(update), num_classes=num_classes,
                                 labels_known=threat.labels_known, options=options)
    attempts: list[AutoAttempt] = []
    best: tuple[Reconstruction, Residual] | None = None
    for step in plan:
        start = time.perf_counter()
        attempt = AutoAttempt(step.name, "ok", step.reason, options=dict(step.options))
        attempts.append(attempt)
        try:
            attacker = make_attack(step.name, model, threat, dict(step.options))
            reconstruction, (residual,) = attack_with_residuals(attacker, [update], truths=truths, quiet=quiet)
        except AttackNotApplicable as error:
            attempt.status, attempt.message = "not applicable", one_line(error, 300)
            continue
        except GradleakError as error:
            attempt.status, attempt.message = "failed", f"{type(error).__name__}: {one_line(error, 300)}"
            continue
        finally:
            attempt.seconds = time.perf_counter() - start
        attempt.residual = residual
        attempt.message = residual.describe()
        if reconstruction.images is not None and better_residual(residual, None if best is None else best[1]):
            best = (reconstruction, residual)
        if reconstruction.interrupted:   # Ctrl-C: no further attack; the run is marked interrupted
            attempt.status = "interrupted"
            break
        if residual.certified:
            break
    if best is None:
        return None, None, attempts, why
    best[0].interrupted = any(a.status == "interrupted" for a in attempts)
    best[0].notes.insert(0, f"attacks='auto' ({why}): chose {best[0].attack} of "
                            f"{', '.join(a.attack + ' ' + a.status for a in attempts)}; {best[1].describe()}")
    return best[0], best[1], attempts, why


def demo(out: str | Path = "runs/demo", *, data: DataRequest | str = "photos", model: ModelSpec | str = "mlp",
         quiet: bool = False) -> RunResult:
    """The quick-start job: every client shares the FedSGD gradient of one real image; the
    server inverts the first fully connected layer of each in closed form (``fc-bias``).

    Writes the clients' update files to ``out/updates/`` and the run folder to ``out``.
    """
    return attack_simulated("fc-bias", out, data=data, model=model, quiet=quiet, save_updates=True)
