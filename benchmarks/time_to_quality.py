"""Time to quality of Inverting Gradients: would an earlier stop or an earlier step decay
reach the same PSNR sooner? (issue 14, a first experiment; defaults are not changed here.)

    .venv/bin/python benchmarks/time_to_quality.py [--photos 8 9] [--budgets 1200 400]

gradleak's ConvNet-64 (zoo ``convnet``, width 64), eval-mode BatchNorm, batch 1, labels
inferred, one torch thread, the held-out photos 8 and 9 (flower, grace_hopper) by default.
For each iteration budget N the Inverting Gradients preset runs with its step decay at
3/8, 5/8, 7/8 of N (so a smaller N decays earlier), recording every 10 iterations the
matching loss and the PSNR of the best iterate with the wall seconds so far. From the curve
of each run it reports: the final PSNR, the seconds to come within 0.5 dB of it, and where
a ``patience`` rule (stop after P iterations without a lower matching loss, read off the
curve at its 10-iteration resolution) would have stopped and at what PSNR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import Clock  # noqa: E402

import gradleak as gl  # noqa: E402
from gradleak._io import atomic_write_json  # noqa: E402
from gradleak.data import load_builtin  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "time_to_quality.json"


def patience_stop(curve: list[dict], patience: int) -> dict | None:
    """The first recorded point where the best loss has not improved for ``patience`` iterations."""
    best, last = float("inf"), 0
    for point in curve:
        if point["loss"] < best:
            best, last = point["loss"], point["iteration"]
        elif point["iteration"] - last >= patience:
            return point
    return None


def run(model, update, image, iterations: int) -> list[dict]:
    clock = Clock(image)
    result = gl.get_attack("inverting-gradients")(model, iterations=iterations, record_every=10).reconstruct(
        update, monitor=clock.monitor, progress=clock.progress)
    h = result.history
    best, curve = float("inf"), []
    for it, loss, seconds, psnr in zip(h["loss"]["x"], h["loss"]["y"], h["seconds"]["y"], h["psnr"]["y"]):
        best = min(best, loss)
        curve.append({"iteration": it, "loss": best, "seconds": seconds, "psnr": psnr})
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, nargs="+", default=[8, 9])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1200, 400])
    parser.add_argument("--patience", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = load_builtin("photos", size=32)
    built = gl.ModelSpec("convnet", {"width": 64}, mode="eval", device="cpu").build((3, 32, 32), 10)
    rows = []
    for k in args.photos:
        image, label = photos.images[k:k + 1], photos.labels[k:k + 1]
        update = gl.fedsgd_update(built.module, image, label)
        for n in args.budgets:
            curve = run(built.module, update, image, n)
            final = curve[-1]["psnr"]
            settled = next(p for p in curve if p["psnr"] >= final - 0.5)
            row = {"photo": photos.classes[k], "iterations": n, "final_psnr": final, "seconds": curve[-1]["seconds"],
                   "seconds_to_settle": settled["seconds"], "iteration_settled": settled["iteration"],
                   "patience": {}, "load": os.getloadavg()[0], "curve": curve}
            for p in args.patience:
                stop = patience_stop(curve, p)
                row["patience"][p] = None if stop is None else {k2: stop[k2] for k2 in ("iteration", "seconds", "psnr")}
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "curve"}), flush=True)
    atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
