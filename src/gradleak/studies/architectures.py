"""Seed 004's experiment: DLG against LeNet, ResNet-18, DenseNet-121 and Inception-v3.

The study (Khowaja 2022, after Zhu et al. 2019) replaces every ReLU by a Sigmoid, feeds
the same image to each model at its own resolution (LeNet 32 px scaled to [0, 1];
ResNet-18 and DenseNet-121 224 px and Inception-v3 299 px with ImageNet normalization),
runs DLG (L-BFGS on the squared gradient distance with soft labels) from randomly
initialised weights, and compares the MSE to the true image step by step. Its claims:
LeNet's MSE is about 10x lower than ResNet-18's at equal steps; DenseNet-121 converges in
about 50 steps; Inception-v3 does not converge in 300.

:func:`architecture_study` writes, into one folder: ``mse.png`` (MSE vs. L-BFGS step, all
models on one plot), ``strip.png`` (the image at evenly spaced steps, one row per model),
``table.json`` and ``report.html``. The step budget is an argument: the default finishes
in minutes on a 2-core CPU, the seed's 300 steps take hours there.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from .._io import atomic_write_json, atomic_write_text, save_figure, staged_folder
from ..attacks.optimization import DLG
from ..client import fedsgd_update
from ..data import load_builtin
from ..data.spec import IMAGENET_SPEC, DataSpec
from ..errors import ConfigError
from ..metrics import mse, psnr
from ..models import build_model
from ..models.spec import resolve_device
from ..report.page import image_tag

__all__ = ["ARCHITECTURES", "ArchitectureResult", "architecture_study"]

#: model name in the zoo -> (input side in pixels, normalization) as in seed 004
ARCHITECTURES: dict[str, tuple[int, DataSpec]] = {
    "lenet": (32, DataSpec()),
    "tv-resnet18": (224, IMAGENET_SPEC),
    "tv-densenet121": (224, IMAGENET_SPEC),
    "tv-inception_v3": (299, IMAGENET_SPEC),
}


@dataclass
class ArchitectureResult:
    model: str
    pixels: int
    parameters: int
    steps: int
    mse_start: float
    mse_final: float
    psnr_final: float
    seconds: float
    mse_curve: list[float]
    steps_run: int = 0          # L-BFGS steps actually run (fewer than ``steps`` when the time budget ran out)
    interrupted: bool = False   # Ctrl-C stopped this model's run (the study ran no further model)


def _snapshot_steps(steps: int, count: int) -> list[int]:
    return sorted({round(i * steps / (count - 1)) for i in range(count)}) if count > 1 else [steps]


def architecture_study(out: str | Path = "runs/architectures", *, steps: int = 300, inner: int = 20,
                       models: Sequence[str] = tuple(ARCHITECTURES), image: int = 1, snapshots: int = 6,
                       num_classes: int = 10, seed: int = 0, quiet: bool = False,
                       device: str = "auto", time_budget: float | None = None) -> list[ArchitectureResult]:
    """Run DLG on each sigmoid model with the same photo (index ``image`` of the built-in
    photos); ``steps`` L-BFGS steps of at most ``inner`` evaluations each (the seed's budget:
    300 x 20), each model stopping early after ``time_budget`` seconds when given (the
    224/299-px models need 2-6 s per evaluation on a CPU). Ctrl-C stops the study: the models
    run so far are written, the last one marked ``interrupted``."""
    unknown = [m for m in models if m not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"models {unknown} are not part of the study; choose from {list(ARCHITECTURES)}")
    if steps < 1 or inner < 1 or snapshots < 1:
        raise ConfigError(f"steps, inner and snapshots must be >= 1, got {steps}, {inner}, {snapshots}")
    from ..pipeline import progress_bar

    out = Path(out)
    target = resolve_device(device)
    wanted = _snapshot_steps(steps, snapshots)
    results, strips = [], {}
    with progress_bar(quiet) as progress:
        task = progress.add_task("DLG across architectures", total=len(models) * steps)
        try:
            for name in models:
                side, spec = ARCHITECTURES[name]
                photo = load_builtin("photos", size=side).select([image])
                model = build_model(name, (3, side, side), num_classes, seed=seed, activation="sigmoid").to(target)
                images = photo.images.to(target)
                label = (photo.labels % num_classes).to(target)
                update = fedsgd_update(model, images, label, spec=spec)
                curve, frames, calls = [], {}, [0]

                def monitor(images, truth=images):
                    step = calls[0]
                    calls[0] += 1
                    if step in wanted:
                        frames[step] = images.detach().clamp(0, 1).clone()
                    value = float(mse(images, truth)[0])
                    curve.append(value)
                    progress.update(task, advance=1)
                    return {"mse": value}

                attack = DLG(model, iterations=steps, lbfgs_inner=inner, record_every=1, seed=seed,
                             time_budget=time_budget)
                start = time.perf_counter()
                rec = attack.reconstruct(update, monitor=monitor)
                seconds = time.perf_counter() - start
                frames.setdefault(max(len(curve) - 1, 0), rec.images.clamp(0, 1))  # the last step run
                strips[name] = sorted(frames.items())
                results.append(ArchitectureResult(
                    model=name, pixels=side, parameters=sum(p.numel() for p in model.parameters()), steps=steps,
                    mse_start=curve[0] if curve else math.nan, mse_final=float(mse(rec.images, images)[0]),
                    psnr_final=float(psnr(rec.images, images)[0]), seconds=seconds, mse_curve=curve,
                    steps_run=len(curve)))
                if rec.interrupted:
                    results[-1].interrupted = True
                    break
        except KeyboardInterrupt:  # outside an attack (building a model, say): keep the models finished
            if not results:
                raise
            results[-1].interrupted = True
    with staged_folder(out) as stage:  # the folder whole or not at all
        _write(stage, results, strips, steps, inner)
    return results


def _write(out: Path, results, strips, steps, inner) -> None:
    figure = Figure(figsize=(6.5, 4))
    ax = figure.subplots()
    for r in results:
        ax.plot(range(len(r.mse_curve)), r.mse_curve, label=f"{r.model} ({r.pixels} px)")
    ax.set(xlabel="L-BFGS step", ylabel="MSE to the true image", yscale="log",
           title=f"DLG with sigmoid activations ({inner} evaluations per step)")
    ax.grid(True, color="0.9")
    ax.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, out / "mse.png", dpi=110)
    columns = max(len(v) for v in strips.values())
    figure = Figure(figsize=(1.6 * columns, 1.7 * len(strips)))
    axes = figure.subplots(len(strips), columns, squeeze=False)
    for row, (name, frames) in enumerate(strips.items()):
        for col in range(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(frames):
                step, frame = frames[col]
                ax.imshow(frame[0].permute(1, 2, 0).cpu().float().numpy())
                ax.set_title(f"step {step}" + (" (last)" if col == len(frames) - 1 and step < steps - 1 else ""),
                             fontsize=7)
            else:
                ax.axis("off")
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    figure.tight_layout()
    save_figure(figure, out / "strip.png", dpi=110)
    atomic_write_json(out / "table.json", [asdict(r) for r in results])
    rows = "".join(
        f"<tr><td>{html.escape(r.model)}</td><td>{r.pixels}</td><td>{r.parameters:,}</td><td>{r.steps_run}</td>"
        f"<td>{r.mse_start:.4g}</td><td>{r.mse_final:.4g}</td><td>{r.psnr_final:.1f}</td>"
        f"<td>{r.seconds:.0f}</td></tr>" for r in results)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>DLG across architectures</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body><h1>DLG across architectures (seed 004)</h1>"
        f"<p>{steps} L-BFGS steps of at most {inner} evaluations, sigmoid activations, the same photo.</p>"
        "<table><tr><th>model</th><th>px</th><th>parameters</th><th>steps</th><th>MSE start</th>"
        f"<th>MSE final</th><th>PSNR final (dB)</th><th>seconds</th></tr>{rows}</table>"
        f"<h2>MSE vs. step</h2>{image_tag(out / 'mse.png', 'MSE vs step')}<h2>Evolution</h2>{image_tag(out / 'strip.png', 'evolution')}"
        "</body></html>")
    atomic_write_text(out / "report.html", page)
