"""Subnormal floats in gradient matching: seconds per iteration with and without the engine's loss scaling.

    python benchmarks/subnormal.py [--net sgd] [--images 0,3] [--iterations 60] [--repeats 2]

A trained network classifies its own training images with ``1 - p`` below float32's epsilon: the
client's gradient is ~1e-9 and smaller, and the candidate's backward and the matching objective's
double backward run through subnormal values that CPUs process many times slower. The engine
multiplies the candidate's loss by a power of two near its own size before the backward
(``gradleak.attacks.optimization.loss_scaled_to_one``, cosine objectives only; exact). This runs
Inverting Gradients (its defaults, eval mode, batch 1) on the trained ResNet20-4 digit networks of
``benchmarks/trained_grid.py`` (trained there on first use, ~5 min), on training images (never
reported as attack results), with the scaling and with it switched off, interleaved in one process
so both see the same load; prints seconds per iteration, the ratio, the matching loss each reached
(the same up to float rounding: the scaling does not change the objective) and the update's norm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trained_grid

from gradleak.attacks import optimization


def seconds_per_iteration(module, record, image, label, iterations: int, scaled: bool) -> tuple[float, dict]:
    """(seconds per iteration, trained_grid's row: the returned iterate's loss, the update's norm) of one attack."""
    kept = optimization.SCALE_FREE_OBJECTIVES
    optimization.SCALE_FREE_OBJECTIVES = kept if scaled else ()
    try:
        started = time.perf_counter()
        row, _ = trained_grid.attack_one(module, record, image, label, "eval", {"iterations": iterations,
                                                                               "record_every": iterations})
        return (time.perf_counter() - started) / iterations, row
    finally:
        optimization.SCALE_FREE_OBJECTIVES = kept


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="sgd", help="a trained_grid recipe (sgd, sgd-nowd, adam, ...)")
    parser.add_argument("--images", default="0,3", help="digit training images (indices)")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = argparse.Namespace(data="digits", model="resnet20", options='{"width": 4}', seed=0, size=32,
                              n_data=None, epochs=None, test_fraction=0.2)
    module, record = trained_grid.network(grid, args.net)
    indices = [int(i) for i in args.images.split(",")]
    if set(indices) & set(record["held_out_indices"]):
        raise SystemExit(f"--images: {sorted(set(indices) & set(record['held_out_indices']))} are held out; "
                         "use training images")
    images, labels = trained_grid._images(grid, record, "chosen", indices)
    print(f"ResNet20-4 {args.net}, Inverting Gradients {args.iterations} iterations x {args.repeats}, "
          f"{args.threads} thread(s)")
    for i, index in enumerate(indices):
        x, y = images[i:i + 1], labels[i:i + 1]
        times = {True: [], False: []}
        rows = {}
        for _ in range(args.repeats):
            for scaled in (True, False):
                t, rows[scaled] = seconds_per_iteration(module, record, x, y, args.iterations, scaled)
                times[scaled].append(t)
        on, off = min(times[True]), min(times[False])
        print(f"image {index}: update norm {rows[True]['update_norm']:.3g}; s/iteration scaled {on:.3f}, unscaled "
              f"{off:.3f} (x{off / on:.1f}); matching loss {rows[True]['returned_loss']:.4g} / "
              f"{rows[False]['returned_loss']:.4g}", flush=True)


if __name__ == "__main__":
    main()
