"""Run folders: everything one attack run produced, written atomically into one folder.

::

    RUN_DIR/
      config.json                 what was run (attack, options, model, data, threat model)
      metrics.json                scores after matching, label accuracy, the update residual
                                  (truth-free), the method's notes
      per_image.csv               every image's scores (recovered or not), for a spreadsheet
      history.json                the attack's curves
      reconstruction.safetensors  recovered images/labels/features, and the ground truth
      grid.png                    originals above their matched reconstructions, with PSNR
      curves.png                  the curves of history.json
      report.html                 a self-contained page showing all of the above

Ground truth is stored beside the reconstruction for evaluation only; it never reaches an
attack. :func:`rebuild_report` regenerates the pictures and the page from the stored files.

A run folder handed to ``gradleak report`` (or a ``--truth`` file) may have been tampered
with: :func:`load_run` and :func:`load_truth` read JSON files of at most
:data:`MAX_RUN_JSON_BYTES` (64 MiB) and safetensors files of at most
:data:`MAX_RUN_TENSOR_BYTES` (1 GiB), never unpickle, and check every entry that the
pictures and the page use (types, shapes, finiteness, indices in range, at most
:data:`~gradleak._runfiles.MAX_RUN_IMAGES` images and ``MAX_HISTORY_PANELS`` curve panels); each failure is
one :class:`~gradleak.errors.DataError` line naming the file and the entry.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save as safetensors_save

from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text, csv_text, from_json_float, staged_folder
from .attacks.base import Reconstruction
from .data._files import quote, read_json, read_safetensors
from ._runfiles import (_IMAGE_DTYPES, _LABEL_DTYPES, MAX_RUN_JSON_BYTES, MAX_RUN_TENSOR_BYTES, _check_history,
                        _check_matching, _check_metrics, _check_tensors, _json_kind, _run_folder)
from .errors import DataError
from .metrics import Scores, score
from .residual import Residual, residual_summary
from .shares import mixture_parts
from .report import curves_figure, reconstruction_grid, share_notes, write_html_report

__all__ = ["RunResult", "write_run", "load_run", "rebuild_report", "save_truth", "load_truth"]

PER_IMAGE_COLUMNS = ("index", "recovered", "matched_to", "psnr", "ssim", "mse", "lpips")


@dataclass
class RunResult:
    run_dir: Path
    reconstruction: Reconstruction
    scores: Scores | None
    residuals: list[Residual] | None = None

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"

    def __repr__(self) -> str:
        """The folder and the figures a person looks for, never tensor values."""
        from .metrics import recovery_counts

        parts = [f"run_dir={str(self.run_dir)!r}", f"attack={self.reconstruction.attack!r}"]
        summary = self.scores.summary if self.scores is not None else {}
        if summary:
            parts.append(recovery_counts(summary) or f"{summary.get('n_images')} images")
            if summary.get("psnr_mean") is not None:
                parts.append(f"PSNR {summary['psnr_mean']:.1f} dB")
            if summary.get("label_accuracy") is not None:
                parts.append(f"labels {100 * summary['label_accuracy']:.0f} %")
        if self.residuals:
            certified = sum(r.certified for r in self.residuals)
            parts.append(f"{certified} of {len(self.residuals)} update(s) certified exact")
        return f"RunResult({', '.join(parts)})"


def _tensors(reconstruction: Reconstruction, originals, true_labels) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    if reconstruction.images is not None:
        tensors["images"] = reconstruction.images
    if reconstruction.labels is not None:
        tensors["labels"] = reconstruction.labels.to(torch.int64)
    for name, value in reconstruction.features.items():
        tensors[f"features/{name}"] = value
    if originals is not None:
        tensors["originals"] = originals
    if true_labels is not None:
        tensors["true_labels"] = true_labels.to(torch.int64)
    # copies: safetensors refuses two entries that share memory (labels passed again as the truth)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _matched_pairs(images: torch.Tensor, originals: torch.Tensor, rows: list[dict[str, Any]],
                   notes: list[str | None] | None):
    """Each original's reconstruction (a grey square where none was recovered), its label and its note."""
    matched = {row["index"]: row for row in rows if row.get("matched_to") is not None}
    grey = torch.full_like(originals[0], 0.5)
    order = [matched[i]["matched_to"] if i in matched else None for i in range(originals.shape[0])]
    pairs = [grey if k is None else images[k].to(originals.dtype) for k in order]
    labels = [from_json_float(matched[i]["psnr"]) if i in matched else "not recovered"
              for i in range(originals.shape[0])]
    return torch.stack(pairs), labels, None if notes is None else [None if k is None else notes[k] for k in order]


def _shares(residuals: list[Residual] | None, n: int) -> list[float] | None:
    """The reconstruction's per-image shares of its updates (each update's, in order), when every update has them."""
    if not residuals or any(r.shares is None for r in residuals):
        return None
    shares = [v for r in residuals for v in r.shares]
    return shares if len(shares) == n else None


def _draw(run_dir: Path, reconstruction: Reconstruction, originals, scores: Scores | None,
          residuals: list[Residual] | None = None) -> None:
    if reconstruction.images is not None:
        images, psnrs = reconstruction.images, None
        n = images.shape[0]
        parts = mixture_parts(reconstruction.notes, n)    # a fitted mixture's parts say more than equal-weight shares
        notes = share_notes(parts, n, "part") if parts is not None else share_notes(_shares(residuals, n), n)
        if originals is not None and scores is not None and scores.per_image:
            images, psnrs, notes = _matched_pairs(reconstruction.images, originals, scores.per_image, notes)
        reconstruction_grid(images, run_dir / "grid.png", originals=originals, psnr=psnrs, notes=notes,
                            title=f"{reconstruction.attack}: originals (top) and reconstructions")
    per_unit = all(k.startswith("unit_deviation") for k in reconstruction.history)
    x_label = "unit (by |dL/db|)" if per_unit else "iteration"
    curves_figure(reconstruction.history, run_dir / "curves.png", x_label=x_label, title=reconstruction.attack)


def write_run(run_dir: str | Path, reconstruction: Reconstruction, *, originals: torch.Tensor | None = None,
              true_labels: torch.Tensor | None = None, config: dict[str, Any] | None = None,
              use_lpips: bool = True, residuals: list[Residual] | None = None,
              extra_metrics: dict[str, Any] | None = None, updates: Sequence[Any] = ()) -> RunResult:
    """Score ``reconstruction`` against the ground truth (if given) and write the run folder.
    ``residuals``: the update residual of each attacked update (:mod:`gradleak.residual`, the
    truth-free measure), recorded in ``metrics.json`` under ``"residual"``; ``extra_metrics``:
    more entries for ``metrics.json`` (e.g. ``"auto"``: the attacks ``attacks="auto"`` tried);
    ``updates`` (the clients' :class:`~gradleak.update.SharedUpdate` s) go to
    ``updates/client-NN.safetensors``. The folder is written whole or not at all
    (:func:`gradleak._io.staged_folder`): a failure midway leaves no half folder behind."""
    from .update_file import save_update

    run_dir = Path(run_dir)
    scores = None
    if originals is not None:
        scores = score(reconstruction.images, originals, predicted_labels=reconstruction.labels,
                       true_labels=true_labels, use_lpips=use_lpips)
    with staged_folder(run_dir) as stage:
        for k, update in enumerate(updates):
            save_update(update, stage / "updates" / f"client-{k:02d}.safetensors")
        atomic_write_bytes(stage / "reconstruction.safetensors",
                           safetensors_save(_tensors(reconstruction, originals, true_labels)))
        atomic_write_json(stage / "history.json", reconstruction.history)
        atomic_write_json(stage / "config.json", {"attack": reconstruction.attack, **(config or {}),
                                                  "attack_options": reconstruction.config})
        metrics = {"attack": reconstruction.attack, **(scores.to_json() if scores else {}),
                   "notes": list(reconstruction.notes), **dict(extra_metrics or {})}
        if residuals is not None:
            metrics["residual"] = residual_summary(residuals)
        if reconstruction.features:
            metrics["features"] = {name: list(v.shape) for name, v in reconstruction.features.items()}
        atomic_write_json(stage / "metrics.json", metrics)
        if scores is not None:  # the per-image scores for a spreadsheet (gradleak compare puts runs side by side)
            atomic_write_text(stage / "per_image.csv", csv_text(PER_IMAGE_COLUMNS, (
                [row.get(k) for k in PER_IMAGE_COLUMNS] for row in scores.per_image)))
        _draw(stage, reconstruction, originals, scores, residuals)
        write_html_report(stage, name=run_dir.resolve().name)
    return RunResult(run_dir, reconstruction, scores, residuals)


def load_run(run_dir: str | Path) -> tuple[Reconstruction, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a run folder back: the reconstruction, the stored tensors, and metrics.json.

    Every file is checked (see the module's docstring); a tampered file is one DataError
    line naming the file and the entry. config.json, when present, must hold an object."""
    run_dir = _run_folder(run_dir)
    tensor_file, metrics_file = run_dir / "reconstruction.safetensors", run_dir / "metrics.json"
    tensors = read_safetensors(tensor_file, "run file", MAX_RUN_TENSOR_BYTES)
    _check_tensors(tensor_file, tensors)
    metrics = _check_metrics(metrics_file, read_json(metrics_file, "run file", MAX_RUN_JSON_BYTES))
    _check_matching(metrics_file, metrics, tensors)
    history = _check_history(run_dir / "history.json",
                             read_json(run_dir / "history.json", "run file", MAX_RUN_JSON_BYTES))
    if os.path.lexists(run_dir / "config.json"):
        config = read_json(run_dir / "config.json", "run file", MAX_RUN_JSON_BYTES)
        if not isinstance(config, dict):
            raise DataError(f"run file {quote(run_dir / 'config.json')}: must hold a JSON object, got "
                            f"{_json_kind(config)}")
    reconstruction = Reconstruction(
        images=tensors.get("images"),
        labels=tensors.get("labels"),
        features={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("features/")},
        history=history,
        notes=list(metrics.get("notes", [])),
        attack=str(metrics.get("attack") or ""),
    )
    return reconstruction, tensors, metrics


def rebuild_report(run_dir: str | Path) -> Path:
    """Regenerate grid.png, curves.png and report.html from a run folder's stored files
    (validated by :func:`load_run` first)."""
    run_dir = Path(run_dir)
    if _is_text_run(run_dir):      # token ids: gradleak.text.runs rebuilds its page
        from .text.runs import rebuild_text_report

        return rebuild_text_report(run_dir)
    reconstruction, tensors, metrics = load_run(run_dir)
    scores = None
    if "per_image" in metrics:
        scores = Scores(per_image=metrics["per_image"], summary=metrics.get("summary", {}), lpips=metrics.get("lpips", {}))
    _draw(run_dir, reconstruction, tensors.get("originals"), scores)
    for name in ("grid.png", "curves.png"):  # not redrawn (no images): the page would embed what is there
        _check_picture(run_dir / name)
    return write_html_report(run_dir)


def _is_text_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a text run (its reconstruction file stores token ids, not images)."""
    import json

    from ._containers import MAX_HEADER
    from ._runfiles import _run_folder
    path = _run_folder(run_dir) / "reconstruction.safetensors"
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):   # a link, a FIFO: never opened here (load_run refuses it)
            return False
        with open(path, "rb") as handle:         # the header's names only; load_run checks the whole file
            length = int.from_bytes(handle.read(8), "little")
            head = handle.read(length) if length <= MAX_HEADER else b""
        names = set(json.loads(head.decode("utf-8")))
    except (OSError, ValueError, UnicodeDecodeError, TypeError):
        return False                             # not a text run; load_run says what is wrong
    return not ({"images", "originals"} & names) and bool({"tokens", "true_tokens"} & names)


def _check_picture(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RUN_JSON_BYTES:
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else (
            f"{info.st_size} bytes" if stat.S_ISREG(info.st_mode) else "not a regular file")
        raise DataError(f"run file {quote(path)}: is {what}; the report would embed it (remove it and rebuild)")


def save_truth(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write a client's ground truth (for evaluation only, never for an attack)."""
    return atomic_write_bytes(path, safetensors_save({"images": images.detach().cpu().contiguous(),
                                                      "labels": labels.detach().cpu().to(torch.int64).contiguous()}))


def load_truth(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a ground-truth file written by :func:`save_truth`, checking what it holds: a
    safetensors file (never a pickle) of at most :data:`MAX_RUN_TENSOR_BYTES`, with float
    'images' (N, C, H, W) finite in [0, 1] and integer 'labels' (N,) >= 0."""
    path = Path(path)
    if not os.path.lexists(path):
        raise DataError(f"ground truth file not found: {quote(path)}")
    tensors = read_safetensors(path, "ground truth file", MAX_RUN_TENSOR_BYTES)
    images, labels = tensors.get("images"), tensors.get("labels")
    where = f"ground truth file {quote(path)}"
    if images is None or labels is None:
        raise DataError(f"{where}: expected entries 'images' and 'labels', found "
                        f"{', '.join(repr(k) for k in sorted(tensors)[:8]) or 'none'}")
    if images.dtype not in _IMAGE_DTYPES or images.ndim != 4 or images.shape[0] < 1:
        raise DataError(f"{where}: entry 'images' must be a floating-point tensor (N, C, H, W) with N >= 1, got "
                        f"{images.dtype} {tuple(images.shape)}")
    if labels.dtype not in _LABEL_DTYPES or labels.ndim != 1:
        raise DataError(f"{where}: entry 'labels' must be a 1-d integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} 'images' but {labels.shape[0]} 'labels'")
    if not bool(torch.isfinite(images).all()):
        raise DataError(f"{where}: entry 'images' holds NaN or infinite values")
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise DataError(f"{where}: entry 'images' must lie in [0, 1], found [{float(images.min()):.4g}, "
                        f"{float(images.max()):.4g}]")
    if int(labels.min()) < 0:
        raise DataError(f"{where}: entry 'labels' holds a negative label ({int(labels.min())})")
    return images, labels.to(torch.int64)
