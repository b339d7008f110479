"""Restarts: batched with torch.func.vmap vs. looped, seconds per iteration (all restarts).

    python benchmarks/restarts.py [--restarts 8] [--iterations 40] [--threads 1] [--models lenet]

Prints, per model, the time per iteration of one restart, of the restarts looped and batched,
the speed-up of batching, and what the batched restarts cost against one (issue 14's target:
eight LeNet restarts under 3x one), measured in the same run on the same update.
gradleak's `batched_restarts="auto"` picks vmap for models without BatchNorm below 1M
parameters, from these figures (8 restarts, 1 thread:
LeNet 2.43x, ConvNet-16 without BN 1.24x, MLP 1.7M params 0.69x, ConvNet-64 0.97x).
"""

from __future__ import annotations

import argparse
import time

import torch

import gradleak as gl
from gradleak.attacks import GradientMatching
from gradleak.data import load_builtin
from gradleak.models import build_model

MODELS = [("lenet", {}), ("mlp", {"hidden": (512, 256)}), ("convnet", {"batch_norm": False, "width": 16}),
          ("convnet", {"batch_norm": False, "width": 64})]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=None, help="only these zoo names (default: all four rows)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photos = load_builtin("photos", size=32, n=1)
    print(f"{'model':32s} {'params':>10s} {'1 restart':>10s} {'loop s/it':>10s} {'vmap s/it':>10s} {'speed-up':>9s} "
          f"{'vmap / 1':>9s}")
    for name, options in MODELS:
        if args.models and name not in args.models:
            continue
        model = build_model(name, (3, 32, 32), 10, **options)
        update = gl.fedsgd_update(model, photos.images, photos.labels)
        times = {}
        one = GradientMatching(model, iterations=args.iterations)
        GradientMatching(model, iterations=2).reconstruct(update)
        start = time.perf_counter()
        one.reconstruct(update)
        times["one"] = (time.perf_counter() - start) / args.iterations
        for mode in ("loop", "vmap"):
            attack = GradientMatching(model, iterations=args.iterations, restarts=args.restarts, batched_restarts=mode)
            GradientMatching(model, iterations=2, restarts=args.restarts, batched_restarts=mode).reconstruct(update)
            start = time.perf_counter()
            attack.reconstruct(update)
            times[mode] = (time.perf_counter() - start) / args.iterations
        label = f"{name} {options}" if options else name
        params = sum(p.numel() for p in model.parameters())
        print(f"{label:32s} {params:>10,d} {times['one']:>10.4f} {times['loop']:>10.4f} {times['vmap']:>10.4f} "
              f"{times['loop'] / times['vmap']:>8.2f}x {times['vmap'] / times['one']:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
