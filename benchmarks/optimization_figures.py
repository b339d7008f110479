"""The optimisation attacks' published-figure checks, on the built-in photos at 32x32.

    python benchmarks/optimization_figures.py dlg          # DLG, sigmoid LeNet, batch 1, 300 L-BFGS steps
    python benchmarks/optimization_figures.py ig-lenet     # Inverting Gradients, LeNet, batch 1, 4,800 iterations
    python benchmarks/optimization_figures.py ig-resnet18  # Inverting Gradients, CIFAR ResNet-18, batch 1
                                                           # (--eval-mode: BatchNorm on running statistics)
    python benchmarks/optimization_figures.py labels       # iDLG at batch 1; counts on batches of 8
    python benchmarks/optimization_figures.py fedavg       # 4 images, 4 local steps, unrolled
    python benchmarks/optimization_figures.py bn-prior     # BatchNorm-statistics prior (Yin et al. 2021) against
                                                           # train-mode BatchNorm: bn weight 0 ... 1 (--model resnet20)

Each writes a run folder (grid, curves, report) under benchmarks/results/<name>/ and prints
mean ± std PSNR over the images. Options: --n images, --iterations, --threads, --restarts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak.data import load_builtin
from gradleak.metrics import label_accuracy
from gradleak.models import build_model
from gradleak.pipeline import attack_updates
from gradleak.runs import write_run

RESULTS = Path(__file__).parent / "results"


def _run(name, attack, updates, images, labels, batch):
    start = time.perf_counter()
    truths = [images[i : i + batch] for i in range(0, images.shape[0], batch)]
    rec = attack_updates(attack, updates, truths=truths)
    seconds = time.perf_counter() - start
    run = write_run(RESULTS / name, rec, originals=images, true_labels=labels, config={"benchmark": name})
    psnrs = [row["psnr"] for row in run.scores.per_image]
    summary = {"benchmark": name, "n": len(psnrs), "psnr_mean": statistics.fmean(psnrs),
               "psnr_std": statistics.pstdev(psnrs), "psnr": psnrs, "seconds": seconds,
               "label_accuracy": run.scores.summary["label_accuracy"]}
    print(json.dumps(summary, indent=1))
    (RESULTS / name / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def dlg(args):
    photos = load_builtin("photos", size=32, n=args.n)
    model = build_model("lenet", (3, 32, 32), 10, seed=0)
    updates = [gl.fedsgd_update(model, photos.images[k : k + 1], photos.labels[k : k + 1]) for k in range(args.n)]
    return _run("dlg-lenet", gl.get_attack("dlg")(model, iterations=args.iterations or 300), updates,
                photos.images, photos.labels, 1)


def ig(args, model_name, iterations):
    photos = load_builtin("photos", size=32, n=args.n)
    spec = gl.DataSpec.from_images(photos.images)
    model = build_model(model_name, (3, 32, 32), 10, seed=0)
    if args.eval_mode:  # BatchNorm uses running statistics (the Inverting Gradients code's setting)
        model.eval()
    updates = [gl.fedsgd_update(model, photos.images[k : k + 1], photos.labels[k : k + 1], spec=spec)
               for k in range(args.n)]
    attack = gl.get_attack("inverting-gradients")(model, iterations=args.iterations or iterations, record_every=50,
                                                  restarts=args.restarts)
    suffix = ("-eval" if args.eval_mode else "") + (f"-r{args.restarts}" if args.restarts > 1 else "")
    return _run(f"ig-{model_name}{suffix}", attack, updates, photos.images, photos.labels, 1)


def labels(args):
    photos = load_builtin("photos", size=32)
    spec = gl.DataSpec.from_images(photos.images)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, options in (("lenet", {}), ("lenet", {"init": "default"}), ("convnet", {}), ("resnet20", {}), ("mlp", {})):
        key = name + ("-default-init" if options else "")
        single, exact, accuracy = [], 0, []
        for seed in range(4):
            model = build_model(name, (3, 32, 32), 10, seed=seed, **options)
            for k in range(len(photos)):
                update = gl.fedsgd_update(model, photos.images[k : k + 1], photos.labels[k : k + 1], spec=spec)
                single.append(int(gl.get_attack("idlg")(model, iterations=1).reconstruct(update).labels[0]) == k)
            for _ in range(5):
                picks = torch.randint(0, 10, (8,), generator=generator).tolist()
                update = gl.fedsgd_update(model, photos.images[picks], photos.labels[picks], spec=spec)
                found = gl.get_attack("inverting-gradients")(model, iterations=1).reconstruct(update).labels
                accuracy.append(label_accuracy(found, photos.labels[picks]))
                exact += accuracy[-1] == 1.0
        rows[key] = {"idlg_batch1_accuracy": sum(single) / len(single), "batch8_exact": f"{exact}/20",
                     "batch8_mean_accuracy": statistics.fmean(accuracy)}
    print(json.dumps(rows, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "labels.json").write_text(json.dumps(rows, indent=1))


def fedavg(args):
    photos = load_builtin("photos", size=32, n=4)
    spec = gl.DataSpec.from_images(photos.images)
    args.model = args.model or "lenet"
    model = build_model(args.model, (3, 32, 32), 10, seed=0)
    # 4 local SGD steps of one image each (one epoch over the 4 images), lr 1e-3
    delta = gl.fedavg_update(model, photos.images, photos.labels, lr=1e-3, local_steps=4, local_batch_size=1,
                             spec=spec)
    attack = gl.get_attack("fedavg")(model, iterations=args.iterations or 4800, record_every=50)
    return _run(f"fedavg-{args.model}", attack, [delta], photos.images, photos.labels, 4)


def bn_prior(args):
    """Train-mode BatchNorm at batch 1: Inverting Gradients with the BatchNorm-statistics prior of
    Yin et al. 2021 (the attacker is granted the client's batch statistics) at several weights."""
    args.model = args.model or "resnet20"
    photos = load_builtin("photos", size=32, n=args.n)
    spec = gl.DataSpec.from_images(photos.images)
    model = build_model(args.model, (3, 32, 32), 10, seed=0)  # train mode, as a training client runs it
    updates = [gl.fedsgd_update(model, photos.images[k : k + 1], photos.labels[k : k + 1], spec=spec)
               for k in range(args.n)]
    threat = gl.ThreatModel(bn_statistics=True)
    rows = {}
    for weight in (0.0, 1e-3, 1e-2, 1e-1, 1.0):
        attack = gl.get_attack("inverting-gradients")(model, threat, iterations=args.iterations or 1000, bn=weight,
                                                      record_every=50)
        rows[weight] = _run(f"bn-prior-{args.model}-{weight:g}", attack, updates, photos.images, photos.labels, 1)
    print(json.dumps({f"{w:g}": [round(r["psnr_mean"], 2), round(r["psnr_std"], 2)] for w, r in rows.items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["dlg", "ig-lenet", "ig-resnet18", "labels", "fedavg", "bn-prior"])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--model", default=None, help="fedavg: the model (lenet); bn-prior: the model (resnet20)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--restarts", type=int, default=1, help="ig-lenet, ig-resnet18: restarts per image")
    parser.add_argument("--eval-mode", action="store_true", help="models in eval mode (BatchNorm running stats)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"dlg": dlg, "ig-lenet": lambda a: ig(a, "lenet", 4800), "ig-resnet18": lambda a: ig(a, "resnet18", 4800),
     "labels": labels, "fedavg": fedavg, "bn-prior": bn_prior}[args.which](args)
