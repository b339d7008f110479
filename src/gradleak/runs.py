"""Run folders: everything one attack run produced, written atomically into one folder.

::

    RUN_DIR/
      config.json                 what was run (attack, options, model, data, threat model)
      metrics.json                scores after matching, label accuracy, the method's notes
      history.json                the attack's curves
      reconstruction.safetensors  recovered images/labels/features, and the ground truth
      grid.png                    originals above their matched reconstructions, with PSNR
      curves.png                  the curves of history.json
      report.html                 a self-contained page showing all of the above

Ground truth is stored beside the reconstruction for evaluation only; it never reaches an
attack. :func:`rebuild_report` regenerates the pictures and the page from the stored files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ._io import atomic_write_bytes, atomic_write_json, from_json_float
from .attacks.base import Reconstruction
from .errors import DataError
from .metrics import Scores, score
from .report import curves_figure, reconstruction_grid, write_html_report

__all__ = ["RunResult", "write_run", "load_run", "rebuild_report", "save_truth", "load_truth"]


@dataclass
class RunResult:
    run_dir: Path
    reconstruction: Reconstruction
    scores: Scores | None

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"


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
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _draw(run_dir: Path, reconstruction: Reconstruction, originals, scores: Scores | None) -> None:
    if reconstruction.images is not None:
        images, psnrs = reconstruction.images, None
        if originals is not None and scores is not None and scores.per_image:
            matched = {row["index"]: row for row in scores.per_image}
            order = [matched[i]["matched_to"] for i in range(originals.shape[0]) if i in matched]
            images = reconstruction.images[order]
            originals = originals[[i for i in range(originals.shape[0]) if i in matched]]
            psnrs = [from_json_float(matched[i]["psnr"]) for i in sorted(matched)]
        reconstruction_grid(images, run_dir / "grid.png", originals=originals, psnr=psnrs,
                            title=f"{reconstruction.attack}: originals (top) and reconstructions")
    per_unit = all(k.startswith("unit_deviation") for k in reconstruction.history)
    x_label = "unit (by |dL/db|)" if per_unit else "iteration"
    curves_figure(reconstruction.history, run_dir / "curves.png", x_label=x_label, title=reconstruction.attack)


def write_run(run_dir: str | Path, reconstruction: Reconstruction, *, originals: torch.Tensor | None = None,
              true_labels: torch.Tensor | None = None, config: dict[str, Any] | None = None,
              use_lpips: bool = True) -> RunResult:
    """Score ``reconstruction`` against the ground truth (if given) and write the run folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    scores = None
    if originals is not None:
        scores = score(reconstruction.images, originals, predicted_labels=reconstruction.labels,
                       true_labels=true_labels, use_lpips=use_lpips)
    atomic_write_bytes(run_dir / "reconstruction.safetensors",
                       safetensors_save(_tensors(reconstruction, originals, true_labels)))
    atomic_write_json(run_dir / "history.json", reconstruction.history)
    atomic_write_json(run_dir / "config.json", {"attack": reconstruction.attack, **(config or {}),
                                                "attack_options": reconstruction.config})
    metrics = {"attack": reconstruction.attack, **(scores.to_json() if scores else {}),
               "notes": list(reconstruction.notes)}
    if reconstruction.features:
        metrics["features"] = {name: list(v.shape) for name, v in reconstruction.features.items()}
    atomic_write_json(run_dir / "metrics.json", metrics)
    _draw(run_dir, reconstruction, originals, scores)
    write_html_report(run_dir)
    return RunResult(run_dir, reconstruction, scores)


def load_run(run_dir: str | Path) -> tuple[Reconstruction, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a run folder back: the reconstruction, the stored tensors, and metrics.json."""
    run_dir = Path(run_dir)
    needed = ["reconstruction.safetensors", "metrics.json", "history.json"]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise DataError(f"{run_dir} is not a gradleak run folder: {', '.join(missing)} missing")
    try:
        tensors = safetensors_load((run_dir / "reconstruction.safetensors").read_bytes())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = json.loads((run_dir / "history.json").read_text())
    except Exception as error:  # noqa: BLE001 - any parse failure means a damaged run folder
        raise DataError(f"{run_dir}: cannot read the run folder ({error})") from None
    reconstruction = Reconstruction(
        images=tensors.get("images"),
        labels=tensors.get("labels"),
        features={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("features/")},
        history=history,
        notes=list(metrics.get("notes", [])),
        attack=str(metrics.get("attack", "")),
    )
    return reconstruction, tensors, metrics


def rebuild_report(run_dir: str | Path) -> Path:
    """Regenerate grid.png, curves.png and report.html from a run folder's stored files."""
    run_dir = Path(run_dir)
    reconstruction, tensors, metrics = load_run(run_dir)
    scores = None
    if "per_image" in metrics:
        scores = Scores(per_image=metrics["per_image"], summary=metrics.get("summary", {}), lpips=metrics.get("lpips", {}))
    _draw(run_dir, reconstruction, tensors.get("originals"), scores)
    return write_html_report(run_dir)


def save_truth(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write a client's ground truth (for evaluation only, never for an attack)."""
    return atomic_write_bytes(path, safetensors_save({"images": images.detach().cpu().contiguous(),
                                                      "labels": labels.detach().cpu().to(torch.int64).contiguous()}))


def load_truth(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a ground-truth file written by :func:`save_truth`, checking what it holds."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ground truth file not found: {path}")
    try:
        tensors = safetensors_load(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - safetensors raises several types
        raise DataError(f"{path}: not a safetensors ground-truth file ({error})") from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None or images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: expected 'images' (N, C, H, W) and 'labels' (N,), got "
                        f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise DataError(f"{path}: 'images' must be finite floating-point values in [0, 1]")
    return images, labels
