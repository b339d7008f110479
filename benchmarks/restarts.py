"""Restarts: batched with torch.func.vmap vs. looped, seconds per iteration (all restarts).

    python benchmarks/restarts.py [--restarts 8] [--iterations 40] [--threads 1] [--models lenet]
    python benchmarks/restarts.py --paths [--iterations 200] [--repeats 3]     # the command's path vs the engine
    python benchmarks/restarts.py --evaluators [--iterations 200] [--repeats 3]  # the evaluator vs its nested form

Prints, per model, the time per iteration of one restart, of the restarts looped and batched,
the speed-up of batching, and what the batched restarts cost against one (issue 14's target:
eight LeNet restarts under 3x one), measured in the same run on the same update.
``--paths``: Inverting Gradients on LeNet, batch 1 (photo 0), 1 and ``--restarts`` restarts, through the
engine (``attack.reconstruct``) and through ``pipeline.attack_simulated`` (what ``gradleak attack
--attack inverting-gradients --model lenet --n 1 -o restarts=8`` runs: data, client, monitor,
residual, run folder), interleaved in one process so that both see the same load; prints
seconds per iteration (wall and CPU time of the attack alone) and the ratio of R restarts to one.
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


def _paths(args) -> None:
    """R restarts against one, through the engine and through the command's pipeline, interleaved."""
    import os
    import statistics
    import tempfile

    import gradleak.pipeline as pipeline
    from gradleak.data import DataSpec
    from gradleak.data.request import DataRequest

    model = build_model("lenet", (3, 32, 32), 10)
    photos = load_builtin("photos", size=32, n=1)
    update = gl.fedsgd_update(model, photos.images, photos.labels, spec=DataSpec.from_images(photos.images))
    inner = pipeline.attack_with_residuals
    spent = {}

    def timed(*a, **k):   # the attack inside the command: monitor, residual, but not data, client, files
        wall, cpu = time.perf_counter(), time.process_time()
        result = inner(*a, **k)
        spent["t"] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    def engine(restarts):
        attack = gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), iterations=args.iterations,
                                                      restarts=restarts)
        wall, cpu = time.perf_counter(), time.process_time()
        attack.reconstruct(update)
        return time.perf_counter() - wall, time.process_time() - cpu

    def command(restarts):
        with tempfile.TemporaryDirectory() as folder:
            pipeline.attack_simulated("inverting-gradients", f"{folder}/run", data=DataRequest("photos", 1, 32),
                                      model="lenet", options={"iterations": args.iterations, "restarts": restarts},
                                      quiet=True)
        return spent["t"]

    pipeline.attack_with_residuals = timed
    try:
        runs: dict = {}
        for path in (engine, command):   # warm-up: imports, first allocations
            path(1), path(args.restarts)
        for _ in range(args.repeats):
            for path in (engine, command):
                for restarts in (1, args.restarts):
                    runs.setdefault((path.__name__, restarts), []).append(path(restarts))
    finally:
        pipeline.attack_with_residuals = inner
    print(f"LeNet, Inverting Gradients, {args.iterations} iterations, median of {args.repeats}, load "
          f"{os.getloadavg()[0]:.2f}")
    for path in ("engine", "command"):
        for k, clock in ((0, "wall"), (1, "cpu")):
            one = statistics.median(r[k] for r in runs[(path, 1)]) / args.iterations
            many = statistics.median(r[k] for r in runs[(path, args.restarts)]) / args.iterations
            print(f"{path:8s} {clock:4s} 1 restart {one * 1e3:7.2f} ms/it   {args.restarts} restarts "
                  f"{many * 1e3:7.2f} ms/it   ratio {many / one:5.2f}x")


def _evaluators(args) -> None:
    """The restarts' evaluator against its former form, ``vmap(grad_and_value(objective))`` (one
    functorch level more), interleaved in one process on the same update; checks that both give the
    same reconstruction."""
    import statistics

    from gradleak.attacks import _evaluators as ev

    current, nested = ev._vmap_evaluator, ev._nested_vmap_evaluator

    model = build_model("lenet", (3, 32, 32), 10)
    photos = load_builtin("photos", size=32, n=1)
    update = gl.fedsgd_update(model, photos.images, photos.labels)

    def run(form, restarts):
        ev._vmap_evaluator = form
        try:
            attack = GradientMatching(model, iterations=args.iterations, restarts=restarts, batched_restarts="vmap")
            GradientMatching(model, iterations=2, restarts=restarts, batched_restarts="vmap").reconstruct(update)
            start = time.perf_counter()
            result = attack.reconstruct(update)
            return (time.perf_counter() - start) / args.iterations, result.images
        finally:
            ev._vmap_evaluator = current

    times, images = {}, {}
    for _ in range(args.repeats):
        for name, form in (("nested", nested), ("current", current)):
            seconds, images[name] = run(form, args.restarts)
            times.setdefault(name, []).append(seconds)
        times.setdefault("one", []).append(run(current, 1)[0])
    one = statistics.median(times["one"])
    print(f"LeNet, {args.restarts} restarts, {args.iterations} iterations, median of {args.repeats}; one restart "
          f"{one * 1e3:.2f} ms/it")
    for name in ("nested", "current"):
        many = statistics.median(times[name])
        print(f"{name:8s} {many * 1e3:6.2f} ms/it   {many / one:5.2f}x one restart")
    print(f"largest pixel difference between the two: {float((images['nested'] - images['current']).abs().max()):.3g}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=None, help="only these zoo names (default: all four rows)")
    parser.add_argument("--paths", action="store_true", help="the command's path against the engine (LeNet)")
    parser.add_argument("--evaluators", action="store_true", help="the restarts' evaluator against its former "
                        "nested form (LeNet)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.paths:
        return _paths(args)
    if args.evaluators:
        return _evaluators(args)
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
