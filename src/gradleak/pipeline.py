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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .attacks.base import Attack, Reconstruction
from .client import ClientSetup
from .data.spec import DataSpec
from .errors import ConfigError
from .models import MODELS, build_model, model_info
from .runs import RunResult, write_run
from .update import SharedUpdate, save_update

__all__ = ["ClientSetup", "simulate_clients", "attack_updates", "attack_simulated", "attack_file", "demo", "progress_bar",
           "psnr_monitor", "make_attack"]

log = logging.getLogger(__name__)


def progress_bar(quiet: bool = False) -> Progress:
    """A rich progress bar on stderr (disabled when ``quiet``)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=quiet, transient=False)


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
    """Attack each update in turn and join the results.

    ``truths`` (one image batch per update, optional) only feeds :func:`psnr_monitor`, so
    the curves show PSNR over iterations. Interrupting (Ctrl-C) stops the whole call and
    keeps what was reconstructed so far (for an iterative attack, the best iterate of the
    update it was working on): the result is marked ``interrupted``, with a note saying how
    many updates it covers. Ctrl-C before the first result re-raises KeyboardInterrupt.
    ``progress``: a running rich ``Progress`` to add the bars to (default: a new one,
    unless ``quiet``).
    """
    if not updates:
        raise ConfigError("no updates to attack")
    parts: list[Reconstruction] = []
    own = progress is None
    progress = progress_bar(quiet) if own else progress
    with progress if own else contextlib.nullcontext():
        task = progress.add_task(f"{attack.name} on {len(updates)} update(s)", total=len(updates))
        steps = progress.add_task("  iterations", total=None, visible=False)

        def advance(done: int, total: int) -> None:
            progress.update(steps, completed=done, total=total, visible=True)

        interrupted = False
        try:
            for k, update in enumerate(updates):
                monitor = psnr_monitor(truths[k]) if truths is not None else None
                parts.append(attack.reconstruct(update, monitor=monitor, progress=advance))
                progress.advance(task)
                if parts[-1].interrupted:
                    break
        except KeyboardInterrupt:
            if not parts:
                raise
            interrupted = True
        finally:
            if not own:
                progress.remove_task(task)
                progress.remove_task(steps)
    result = Reconstruction.concat(parts)
    result.interrupted = result.interrupted or interrupted
    if result.interrupted:
        partly = " (the last one partly)" if parts[-1].interrupted else ""
        result.notes.append(f"interrupted: {len(parts)} of {len(updates)} updates attacked{partly}")
        log.warning("interrupted: kept %d of %d updates%s", len(parts), len(updates), partly)
    return result


def make_attack(name: str, model: nn.Module, threat, options: dict[str, Any]) -> Attack:
    from .attacks import get_attack

    cls = get_attack(name)
    try:
        return cls(model, threat, **options)
    except TypeError as error:
        raise ConfigError(f"attack {name!r}: bad option ({error}); see help(gradleak.attacks.{cls.__name__})") from None


def attack_simulated(attack: str, out: str | Path, *, data: str = "photos", n: int = 8, size: int | None = 32,
                     batch_size: int = 1, model: str = "mlp", model_options: dict[str, Any] | None = None,
                     labels_known: bool = False, options: dict[str, Any] | None = None,
                     dtype: torch.dtype = torch.float32, seed: int = 0, quiet: bool = False,
                     save_updates: bool = False, client: ClientSetup | None = None,
                     defenses: Any = None) -> RunResult:
    """Simulate clients of ``batch_size`` images on real data (FedSGD, or as ``client``
    says), defended by ``defenses`` (specs or :class:`~gradleak.defenses.Defense` objects),
    attack each update as the server sees it with ``attack``, score against the ground
    truth and write the run folder ``out``."""
    from .data import load_dataset
    from .threat import ThreatModel

    dataset = load_dataset(data, size=size, n=n)
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; known models: {', '.join(MODELS)}")
    loss = MODELS[model].loss
    if loss == "binary_cross_entropy" and len(dataset.classes) != 2:
        raise ConfigError(f"model {model!r} is a binary classifier, but data {data!r} has {len(dataset.classes)} "
                          "classes; use binary data (e.g. faces) or another model")
    images, labels = dataset.images.to(dtype), dataset.labels
    spec = DataSpec.from_images(images)
    shape = tuple(images.shape[1:])
    model_options = dict(model_options or {})
    net = build_model(model, shape, len(dataset.classes), seed=seed, dtype=dtype, **model_options)
    description = model_info(model, shape, len(dataset.classes), seed, **model_options)
    setup = client or ClientSetup(batch_size=batch_size, seed=seed)
    from .defenses import defended_updates, make_defenses

    stack = make_defenses(defenses)
    served = defended_updates(net, images, labels, setup, stack, loss=loss, spec=spec, model_info=description)
    updates = [d.update for d in served]
    out = Path(out)
    if save_updates:
        for k, update in enumerate(updates):
            save_update(update, out / "updates" / f"client-{k:02d}.safetensors")
    threat = ThreatModel(labels_known=labels_known)
    truths = [images[d.indices] for d in served]
    reconstruction = attack_updates(make_attack(attack, net, threat, dict(options or {})), updates, truths=truths,
                                    quiet=quiet)
    kept = [i for d in served[: reconstruction.updates] for i in d.indices]  # fewer if interrupted
    config = {"data": {"name": data, "n": n, "size": size, "classes": list(dataset.classes)}, "model": description,
              "dtype": str(dtype).removeprefix("torch."), "client": setup.to_json(), "data_spec": spec.to_json(),
              "threat": threat.to_json(), "defenses": [d.describe() for d in stack],
              "privacy": [d.privacy for d in served if d.privacy]}
    return write_run(out, reconstruction, originals=images[kept], true_labels=labels[kept], config=config)


def _check_loss(path, update: SharedUpdate, model_loss: str, num_classes: int) -> None:
    """The update's loss and labels must fit the model it names (a BCE update from a 10-class model is refused)."""
    if update.loss != model_loss:
        raise ConfigError(f"{path}: the update says loss {update.loss!r}, but model {update.model['name']!r} trains with "
                          f"{model_loss!r}")
    if update.labels is not None and update.labels.numel():
        top = int(update.labels.max())
        limit = 2 if update.loss == "binary_cross_entropy" else num_classes
        if top >= limit:
            raise ConfigError(f"{path}: label {top} is out of range for {limit} classes ({update.loss})")


def attack_file(update_path: str | Path, attack: str, out: str | Path, *, truth: str | Path | None = None,
                labels_known: bool = False, options: dict[str, Any] | None = None,
                dtype: torch.dtype = torch.float32, quiet: bool = False) -> RunResult:
    """Attack an update file whose model is a zoo model (rebuilt from the file's description)."""
    from .models import model_from_info
    from .runs import load_truth
    from .threat import ThreatModel
    from .update import load_update

    update = load_update(update_path)
    if update.model is None:
        raise ConfigError(f"{update_path} does not name a zoo model; attack it from Python with your own nn.Module: "
                          "get_attack(name)(model, ThreatModel(...)).reconstruct(load_update(path, model))")
    try:  # the description is untrusted: validated and sized on the meta device before anything is built
        net = model_from_info(update.model, dtype=dtype, expected=update.parameters)
    except ConfigError as error:
        raise ConfigError(f"{update_path}: {error}") from None
    _check_loss(update_path, update, MODELS[update.model["name"]].loss, int(update.model["num_classes"]))
    update = update.validate_for(net).to(dtype=dtype)
    threat = ThreatModel(labels_known=labels_known)
    originals = true_labels = None
    if truth is not None:
        originals, true_labels = load_truth(truth)
        originals = originals.to(dtype)
    reconstruction = attack_updates(make_attack(attack, net, threat, dict(options or {})), [update],
                                    truths=None if originals is None else [originals], quiet=quiet)
    config = {"update_file": str(update_path), "model": dict(update.model), "update": {
        k: v for k, v in update.metadata().items() if k not in ("parameters", "model")}, "threat": threat.to_json()}
    return write_run(out, reconstruction, originals=originals, true_labels=true_labels, config=config)


def demo(out: str | Path = "runs/demo", *, data: str = "photos", n: int = 8, size: int = 32, model: str = "mlp",
         dtype: torch.dtype = torch.float32, seed: int = 0, quiet: bool = False,
         model_options: dict[str, Any] | None = None) -> RunResult:
    """The quick-start job: ``n`` clients each share the FedSGD gradient of one real image;
    the server inverts the first fully connected layer of each in closed form (``fc-bias``).

    Writes the clients' update files to ``out/updates/`` and the run folder to ``out``.
    """
    result = attack_simulated("fc-bias", out, data=data, n=n, size=size, batch_size=1, model=model,
                              model_options=model_options, dtype=dtype, seed=seed, quiet=quiet, save_updates=True)
    return result
