"""GradInversion (Yin et al. 2021) vs Inverting Gradients on train-mode BatchNorm ResNets.

    .venv/bin/python benchmarks/gradinversion.py                 # the docs table (~35 min at one thread:
                                                                 # 200 iterations on ResNet-20, 60 on ResNet-18)
    .venv/bin/python benchmarks/gradinversion.py --offset 0 ...  # the batch the options were tuned on

Clients: CIFAR ResNet-20 and ResNet-18, untrained (seed 0), in train mode (BatchNorm on the
batch's statistics, as a training client runs them), one FedSGD gradient of a batch of B = 8
and 16. Images: 32-px tiles of the built-in photos (each photo at 64 px cut into its four
quadrants: 40 real colour images, label = the photo, so B = 16 has repeated labels; tile
``q * 10 + p`` is quadrant q of photo p). The options were tuned on the batch at offset 0; the
table reports the batch at ``--offset`` (24 by default: tiles 24..39, none of the tuning batch).

Both attacks see the same update of the same weights with the same iteration budget per
candidate: ``inverting-gradients`` (one restart, labels counted, no BatchNorm statistics)
and ``gradinversion`` (labels counted, the client's BatchNorm statistics granted, group
consistency over its restarts), so GradInversion spends ``restarts`` times the compute:
the wall time of each is printed. Per-image PSNR (dB, data range 1, after Hungarian
matching), mean PSNR and mean SSIM; results in benchmarks/results/gradinversion.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak._io import atomic_write_json
from gradleak.data import load_photos
from gradleak.metrics import label_accuracy, match, psnr, ssim
from gradleak.models import build_model

RESULTS = Path(__file__).parent / "results"


def photo_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """40 real 32-px colour images: the four quadrants of each built-in photo at 64 px."""
    photos = load_photos(size=64)
    tiles = [photos.images[:, :, 32 * i : 32 * (i + 1), 32 * j : 32 * (j + 1)] for i in range(2) for j in range(2)]
    return torch.cat(tiles), photos.labels.repeat(4)


def scores(rec: gl.Reconstruction, truth: torch.Tensor) -> dict:
    images = rec.images[match(rec.images, truth)].clamp(0, 1)
    per_image = [round(float(v), 2) for v in psnr(images, truth)]
    return {"psnr": per_image, "psnr_mean": round(statistics.fmean(per_image), 2),
            "ssim_mean": round(float(ssim(images, truth).mean()), 3)}


def run_pair(model_name: str, batch: int, offset: int, iterations: int, restarts: int) -> dict:
    images, labels = photo_tiles()
    x, y = images[offset : offset + batch], labels[offset : offset + batch]
    spec = gl.DataSpec.from_images(images)
    model = build_model(model_name, (3, 32, 32), 10, seed=0)  # train mode: what a training client runs
    update = gl.fedsgd_update(model, x, y, spec=spec)
    attacks = {
        "inverting-gradients": gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), iterations=iterations),
        "gradinversion": gl.get_attack("gradinversion")(model, gl.ThreatModel(bn_statistics=True),
                                                        iterations=iterations, restarts=restarts),
    }
    row = {"model": model_name, "batch": batch, "offset": offset, "iterations": iterations, "restarts": restarts}
    for name, attack in attacks.items():
        start = time.perf_counter()
        rec = attack.reconstruct(update)
        row[name] = {**scores(rec, x), "seconds": round(time.perf_counter() - start, 1),
                     "label_accuracy": label_accuracy(rec.labels, y), "note": rec.notes[-1] if name == "gradinversion"
                     else rec.notes[2]}
        print(json.dumps({"model": model_name, "batch": batch, "attack": name, **row[name]}), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | B | it | attack | PSNR mean | SSIM mean | per-image PSNR | labels | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in ("inverting-gradients", "gradinversion"):
            r = row[name]
            label = name if name == "inverting-gradients" else f"gradinversion ({row['restarts']} restarts)"
            lines.append(f"| {row['model']} | {row['batch']} | {row['iterations']} | {label} | {r['psnr_mean']:.2f} | "
                         f"{r['ssim_mean']:.3f} | {', '.join(f'{v:.1f}' for v in r['psnr'])} | "
                         f"{r['label_accuracy']:.0%} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--offset", type=int, default=24, help="first tile of the batch (0: the tuning batch)")
    parser.add_argument("--iterations-resnet20", type=int, default=200)
    parser.add_argument("--iterations-resnet18", type=int, default=60)
    parser.add_argument("--restarts", type=int, default=4, help="gradinversion's group of restarts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not 0 <= args.offset <= 40 - max(args.batches):
        parser.error(f"--offset must leave room for a batch of {max(args.batches)} among the 40 tiles")
    rows = []
    for model_name in args.models:
        iterations = getattr(args, f"iterations_{model_name.replace('-', '_')}", 200)
        for batch in args.batches:
            rows.append(run_pair(model_name, batch, args.offset, iterations, args.restarts))
    print(table(rows))
    atomic_write_json(RESULTS / f"gradinversion-offset{args.offset}.json", rows)


if __name__ == "__main__":
    main()
