"""Seed 003's finding, measured: does a trained network leak less than an untrained one?

    python benchmarks/trained_networks.py compare --data faces --epochs 30 --iterations 1500
    python benchmarks/trained_networks.py sweep --data faces --epochs 30 --iterations 1500 --tune 2
    python benchmarks/trained_networks.py progress --data faces --rounds 40 --checkpoints 0,5,10,20,40

``compare``: one architecture (ConvNet, width 16 by default) trained on the built-in faces or
digits (gradleak.training, centralised, the attacked images held out of training), attacked
untrained (the seed's initialisation) and trained, batch 1 and batch 4, with Inverting
Gradients; the attacked images are held-out images the settings were never tuned on (the
first ``--tune`` held-out images are kept for ``sweep`` and skipped here). Prints PSNR/SSIM
per image, writes a side-by-side grid and a JSON table under benchmarks/results/trained/.

``sweep``: Inverting Gradients settings (TV weight, learning rate, layer weights, iterations,
restarts) on the tuning images only, to choose settings for trained networks.

``progress``: federated training with checkpoints; the same attack on the model as it was at
each checkpoint round (leakage as the global model trains).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak.data.request import DataRequest
from gradleak.metrics import score
from gradleak.models import ModelSpec
from gradleak.report import reconstruction_grid
from gradleak.training import TrainPlan, train_model

RESULTS = Path(__file__).parent / "results" / "trained"


def _trained(args, out: Path):
    spec = ModelSpec(args.model, json.loads(args.options), seed=args.seed)
    data = DataRequest(args.data, n=args.n_data, size=args.size)
    plan = TrainPlan(epochs=args.epochs, lr=args.lr, batch_size=32, optimizer="sgd", weight_decay=5e-4,
                     test_fraction=args.test_fraction, seed=args.seed, eval_every=max(1, args.epochs // 10))
    started = time.perf_counter()
    result = train_model(spec, data, plan, out / "model")
    print(f"trained {args.model} on {args.data}: train accuracy {result.train_accuracy:.3f}, held-out "
          f"{result.held_out_accuracy:.3f} ({time.perf_counter() - started:.0f} s)")
    return spec, data, result


def _images(data: DataRequest, indices: list[int]):
    dataset = data.load()
    return dataset.images[indices], dataset.labels[indices]


def _attack(module, images, labels, batch, data_spec, options, mode):
    """FedSGD updates of consecutive batches, Inverting Gradients on each; per-image PSNR/SSIM."""
    module.train(mode == "train")
    recs = []
    for start in range(0, images.shape[0], batch):
        x, y = images[start:start + batch], labels[start:start + batch]
        update = gl.fedsgd_update(module, x, y, spec=data_spec)
        attack = gl.get_attack("inverting-gradients")(module, gl.ThreatModel(), **options)
        recs.append(attack.reconstruct(update).images)
    rec = torch.cat(recs)
    scores = score(rec, images, use_lpips=False)
    rows = sorted(scores.per_image, key=lambda r: r["index"])
    order = [r["matched_to"] for r in rows]
    return rec[order], [r["psnr"] for r in rows], [r["ssim"] for r in rows]


def _ig_options(args, **overrides):
    options = {"iterations": args.iterations, "tv": args.tv, "lr": args.ig_lr, "restarts": args.restarts,
               "layer_weights": args.layer_weights, "record_every": 50}
    options.update(overrides)
    return options


def compare(args):
    out = RESULTS / f"{args.data}-{args.model}"
    spec, data, trained = _trained(args, out)
    held = trained.held_out_indices[args.tune:args.tune + args.n]
    images, labels = _images(data, held)
    untrained = spec.build(tuple(images.shape[1:]), trained.num_classes).module
    table, grids = {}, {}
    for name, module in (("untrained", untrained), ("trained", trained.model)):
        for batch in args.batches:
            started = time.perf_counter()
            rec, psnr, ssim = _attack(module, images, labels, batch, trained.data_spec, _ig_options(args), args.mode)
            table[f"{name} b{batch}"] = {"psnr": psnr, "ssim": ssim, "psnr_mean": statistics.fmean(psnr),
                                         "ssim_mean": statistics.fmean(ssim), "seconds": time.perf_counter() - started}
            grids[f"{name} b{batch}"] = (rec, psnr)
            print(f"{name:9s} batch {batch}: PSNR {statistics.fmean(psnr):5.2f} dB "
                  f"({', '.join(f'{p:.1f}' for p in psnr)}), SSIM {statistics.fmean(ssim):.3f}")
    for key, (rec, psnr) in grids.items():
        reconstruction_grid(rec, out / f"grid-{key.replace(' ', '-')}.png", originals=images, psnr=psnr,
                            title=f"Inverting Gradients, {args.model} {key} ({args.data}, held out)")
    summary = {"data": args.data, "model": args.model, "options": json.loads(args.options), "held_out": held,
               "train_accuracy": trained.train_accuracy, "held_out_accuracy": trained.held_out_accuracy,
               "attack": _ig_options(args), "mode": args.mode, "results": table}
    (out / "compare.json").write_text(json.dumps(summary, indent=1))


def sweep(args):
    out = RESULTS / f"{args.data}-{args.model}"
    spec, data, trained = _trained(args, out)
    tune = trained.held_out_indices[:args.tune]
    images, labels = _images(data, tune)
    untrained = spec.build(tuple(images.shape[1:]), trained.num_classes).module
    grid = [json.loads(item) for item in args.grid]
    rows = []
    for options in grid:
        for name, module in (("untrained", untrained), ("trained", trained.model)):
            _, psnr, ssim = _attack(module, images, labels, args.batches[0], trained.data_spec,
                                    _ig_options(args, **options), args.mode)
            rows.append({**options, "model": name, "batch": args.batches[0], "psnr": statistics.fmean(psnr),
                         "ssim": statistics.fmean(ssim), "psnr_each": psnr})
            print(json.dumps(rows[-1]), flush=True)
    (out / f"sweep-b{args.batches[0]}-{args.mode}.json").write_text(json.dumps(rows, indent=1))


def progress(args):
    out = RESULTS / f"progress-{args.data}-{args.model}"
    spec = ModelSpec(args.model, json.loads(args.options), seed=args.seed)
    data = DataRequest(args.data, n=args.n_data, size=args.size)
    checkpoints = tuple(int(c) for c in args.checkpoints.split(",") if int(c) > 0)
    plan = TrainPlan(epochs=args.rounds, lr=args.lr, batch_size=16, clients=args.clients, server_lr=1.0,
                     checkpoints=checkpoints, test_fraction=args.test_fraction, seed=args.seed,
                     eval_every=max(1, args.rounds // 10))
    trained = train_model(spec, data, plan, out / "model")
    held = trained.held_out_indices[args.tune:args.tune + args.n]
    images, labels = _images(data, held)
    rows = []
    for round_ in (0, *checkpoints):
        weights = None if round_ == 0 else trained.checkpoints[round_]["path"]
        module = spec.with_(weights=weights).build(tuple(images.shape[1:]), trained.num_classes).module
        accuracy = None if round_ == 0 else trained.curve
        _, psnr, ssim = _attack(module, images, labels, 1, trained.data_spec, _ig_options(args), args.mode)
        rows.append({"round": round_, "psnr": psnr, "ssim": ssim, "psnr_mean": statistics.fmean(psnr),
                     "ssim_mean": statistics.fmean(ssim)})
        print(f"round {round_:4d}: PSNR {statistics.fmean(psnr):5.2f} dB, SSIM {statistics.fmean(ssim):.3f}")
        del accuracy
    (out / "progress.json").write_text(json.dumps({"curve": trained.curve, "rows": rows,
                                                    "held_out_accuracy": trained.held_out_accuracy}, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("compare", "sweep", "progress"))
    parser.add_argument("--data", default="faces")
    parser.add_argument("--n-data", type=int, default=200, help="images of the data set used (train + held out)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--options", default='{"width": 16}', help="model options as JSON")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--checkpoints", default="0,5,10,20,40")
    parser.add_argument("--lr", type=float, default=0.05, help="training learning rate")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--n", type=int, default=4, help="held-out images attacked")
    parser.add_argument("--tune", type=int, default=2, help="held-out images reserved for the sweep")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--tv", type=float, default=1e-2)
    parser.add_argument("--ig-lr", type=float, default=0.1)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--layer-weights", default="equal")
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--grid", nargs="+", default=['{"tv": 1e-3}', '{"tv": 1e-2}', '{"tv": 1e-1}'],
                        help="sweep: attack options to try, each a JSON object")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"compare": compare, "sweep": sweep, "progress": progress}[args.what](args)


if __name__ == "__main__":
    main()
