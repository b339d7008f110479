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
from gradleak.federated import eval_accuracy
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


def _side_by_side(images, grids, path: Path, title: str) -> None:
    """Rows: the originals, then each setting's reconstructions with their PSNR."""
    from matplotlib.figure import Figure

    rows = [("original", images, None)] + [(key, rec, psnr) for key, (rec, psnr) in grids.items()]
    figure = Figure(figsize=(1.3 * images.shape[0] + 1.2, 1.45 * len(rows) + 0.5), dpi=120)
    axes = figure.subplots(len(rows), images.shape[0], squeeze=False)
    for r, (name, batch, psnr) in enumerate(rows):
        for c in range(images.shape[0]):
            ax = axes[r][c]
            picture = batch[c].detach().clamp(0, 1).cpu()
            ax.imshow(picture[0] if picture.shape[0] == 1 else picture.permute(1, 2, 0), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if psnr is not None:
                ax.set_title(f"{psnr[c]:.1f} dB", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


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
    _side_by_side(images, grids, out / f"trained-vs-untrained-{args.mode}.png",
                  f"Inverting Gradients on {args.model} ({args.data}, held-out images, {args.mode}-mode BatchNorm, "
                  f"{args.iterations} it)")
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
    dataset = data.load()
    test = dataset.select([i - data.start for i in trained.held_out_indices])
    for round_ in (0, *checkpoints):
        weights = None if round_ == 0 else out / "model" / trained.checkpoints[round_]["path"]
        module = spec.with_(weights=weights, mode="eval").build(tuple(images.shape[1:]), trained.num_classes).module
        held_out = eval_accuracy(module, test, trained.data_spec)
        _, psnr, ssim = _attack(module, images, labels, 1, trained.data_spec, _ig_options(args), args.mode)
        rows.append({"round": round_, "held_out_accuracy": held_out, "psnr": psnr, "ssim": ssim,
                     "psnr_mean": statistics.fmean(psnr), "ssim_mean": statistics.fmean(ssim)})
        print(f"round {round_:4d}: held-out accuracy {held_out:.3f}, PSNR {statistics.fmean(psnr):5.2f} dB "
              f"({', '.join(f'{p:.1f}' for p in psnr)}), SSIM {statistics.fmean(ssim):.3f}", flush=True)
    (out / "progress.json").write_text(json.dumps({"curve": trained.curve, "rows": rows,
                                                    "held_out_accuracy": trained.held_out_accuracy}, indent=1))
    replot(args)


def _progress_figure(rows: list[dict], path: Path, title: str) -> None:
    """PSNR per image (dots) and their mean (line) against the round, held-out accuracy beside."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=120)
    ax = figure.subplots()
    rounds = [r["round"] for r in rows]
    for r in rows:
        ax.scatter([r["round"]] * len(r["psnr"]), r["psnr"], s=12, color="0.6")
    ax.plot(rounds, [r["psnr_mean"] for r in rows], "o-", color="#cf222e", label="mean PSNR (dB)")
    ax.set(xlabel="federated round", ylabel="PSNR (dB)")
    ax.set_title(title, fontsize=8)
    twin = ax.twinx()
    twin.plot(rounds, [100 * r["held_out_accuracy"] for r in rows], "s--", color="#0969da", label="held-out accuracy")
    twin.set(ylabel="held-out accuracy (%)", ylim=(0, 105))
    ax.legend(loc="lower left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def replot(args):
    out = RESULTS / f"progress-{args.data}-{args.model}"
    rows = json.loads((out / "progress.json").read_text())["rows"]
    _progress_figure(rows, out / "leakage-vs-round.png",
                     f"Inverting Gradients on {args.model} during FedAvg\n({args.data}, held-out images, batch 1)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("compare", "sweep", "progress", "replot"))
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
    {"compare": compare, "sweep": sweep, "progress": progress, "replot": replot}[args.what](args)


if __name__ == "__main__":
    main()
