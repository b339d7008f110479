"""Inverting Gradients at higher resolution: a CIFAR ResNet at 32, 64 and 128 px.

    python benchmarks/resolution.py --sides 32 64 128 --n 2 --iterations 1500

ResNet-20 (He et al. 2016; any side works: global average pooling before the classifier),
eval-mode BatchNorm (the Inverting Gradients code's setting), batch 1, labels inferred, the
built-in photos resized to each side. For every side: seconds per iteration (median of the
timed iterations), peak memory (RSS growth), PSNR/SSIM per image, and the grid at full size
under benchmarks/results/resolution/<model><tag>/<side>/. Prints a table; writes resolution.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak.data.request import DataRequest
from gradleak.models import ModelSpec
from gradleak.pipeline import attack_simulated

RESULTS = Path(__file__).parent / "results" / "resolution"


def _seconds_per_iteration(side: int, model: str, options: dict, probe: int = 10) -> float:
    """Median seconds of one Inverting Gradients iteration at ``side`` px (after a warm-up)."""
    built = ModelSpec(model, options, mode="eval").build((3, side, side), 10)
    photos = DataRequest("photos", 1, side).load()
    update = gl.fedsgd_update(built.module, photos.images, photos.labels)
    times = []

    def progress(done, total):
        times.append(time.perf_counter())

    gl.get_attack("inverting-gradients")(built.module, iterations=probe + 2).reconstruct(update, progress=progress)
    steps = [b - a for a, b in zip(times[2:], times[3:])]
    return statistics.median(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--start", type=int, default=0, help="first built-in photo")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--options", default="{}")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--tv", type=float, default=1e-2, help="total-variation weight")
    parser.add_argument("--tag", default="", help="suffix of the results folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    rows = []
    for side in args.sides:
        per_iteration = _seconds_per_iteration(side, args.model, options)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        run = attack_simulated("inverting-gradients", RESULTS / f"{args.model}{args.tag}" / str(side),
                               data=DataRequest("photos", args.n, side, args.start),
                               model=ModelSpec(args.model, options, mode="eval"),
                               options={"iterations": args.iterations, "record_every": 50, "tv": args.tv},
                               quiet=True)
        rows.append({"side": side, "seconds_per_iteration": per_iteration, "seconds": time.perf_counter() - started,
                     "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024,
                     "psnr": [r["psnr"] for r in run.scores.per_image], "ssim": [r["ssim"] for r in run.scores.per_image],
                     "psnr_mean": run.scores.summary["psnr_mean"], "iterations": args.iterations})
        print(json.dumps(rows[-1]), flush=True)
    (RESULTS / f"{args.model}{args.tag}" / "resolution.json").write_text(json.dumps(
        {"model": args.model, "options": options, "tv": args.tv, "iterations": args.iterations, "rows": rows}, indent=1))
    print(f"{'side':>5} {'s/it':>8} {'PSNR':>7} {'SSIM':>6} {'minutes':>8}")
    for r in rows:
        print(f"{r['side']:>5} {r['seconds_per_iteration']:8.3f} {r['psnr_mean']:7.2f} "
              f"{statistics.fmean(r['ssim']):6.3f} {r['seconds'] / 60:8.1f}")


if __name__ == "__main__":
    main()
