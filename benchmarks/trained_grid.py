"""Seed 003 across training recipes: trained against untrained networks, per held-out image.

    python benchmarks/trained_grid.py train  --data faces  [--model convnet --options '{"width": 16}']
    python benchmarks/trained_grid.py attack --data faces  --nets untrained sgd adam --modes eval --batches 1 --n 16
    python benchmarks/trained_grid.py table  [--data faces digits] [--tag default]
    python benchmarks/trained_grid.py figure --data digits --nets untrained adam --mode eval --batch 1

``train`` trains the model once per recipe of :data:`RECIPES` (gradleak.training, the code of
``gradleak train``; the equivalent command is printed and stored) and caches the weights under
``benchmarks/results/trained-grid/<data>-<model>/<recipe>/``. ``attack`` runs a gradient-matching
attack (Inverting Gradients by default; ``--attack-options`` and ``--tag`` name a variant) on
held-out images the training never saw: the held-out split's images ``--tune`` onwards (the first
``--tune`` are for tuning, never reported), and for 10-class grayscale sets also the built-in
photos 8 and 9 (held out everywhere in the project). Each image's result is appended to a JSONL
file as soon as it is known, so a cut run loses at most one attack and a rerun skips what is done.
``untrained`` is the same architecture at the recipes' common initialisation (seed 0).
Clients normalise with the training set's statistics (recorded in the weights file).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

import gradleak as gl
from gradleak.data import load_builtin
from gradleak.data.request import DataRequest
from gradleak.metrics import score
from gradleak.models import ModelSpec
from gradleak.residual import update_shares
from gradleak.training import TrainPlan, train_model

RESULTS = Path(__file__).parent / "results" / "trained-grid"

# Training recipes users run (centralised SGD with momentum or Adam, weight decay on or off,
# FedAvg). Epochs are per data set: the faces have 160 training images, the digits 1,437.
RECIPES = {
    "sgd": dict(optimizer="sgd", lr=0.05, weight_decay=5e-4),
    "sgd-nowd": dict(optimizer="sgd", lr=0.05, weight_decay=0.0),
    "adam": dict(optimizer="adam", lr=1e-3, weight_decay=0.0),
    "adam-wd": dict(optimizer="adam", lr=1e-3, weight_decay=5e-4),
    "fedavg": dict(optimizer="sgd", lr=0.05, clients=8, batch_size=16),
}
EPOCHS = {"faces": 30, "digits": 10}
ROUNDS = {"faces": 40, "digits": 20}
PHOTOS = (8, 9)   # held out everywhere in the project (docs/performance.md)
CHOSEN_HELD_OUT = "chosen-held-out"   # the image set of ``--images`` that are all held-out images
# The engine's note on the iterate it returns ("... restart 0, matching loss 0.01234 after 1500 iteration(s)"):
# its loss, where the history's minimum is sampled every record_every iterations only.
RETURNED_LOSS = re.compile(r"(?:restart \d+, |iterations\): )matching loss ([0-9.e+-]+) after")


def _folder(args) -> Path:
    options = json.loads(args.options)
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    return RESULTS / f"{Path(str(args.data)).name}-{args.model}{'-' + tag if tag else ''}"


def _plan(args, recipe: str) -> TrainPlan:
    r = dict(RECIPES[recipe])
    federated = "clients" in r
    epochs = args.epochs or (ROUNDS if federated else EPOCHS).get(str(args.data), 10)
    return TrainPlan(epochs=epochs, lr=r["lr"], batch_size=r.get("batch_size", 32), optimizer=r["optimizer"],
                     weight_decay=r.get("weight_decay", 0.0), clients=r.get("clients"), seed=args.seed,
                     test_fraction=args.test_fraction, eval_every=epochs)


def train_command(args, recipe: str) -> str:
    """The ``gradleak train`` command that trains what :func:`_plan` trains."""
    plan = _plan(args, recipe)
    options = " ".join(f"-m {k}={v}" for k, v in json.loads(args.options).items())
    extra = (f"--clients {plan.clients} --batch-size {plan.batch_size}" if plan.federated else
             f"--optimizer {plan.optimizer} --weight-decay {plan.weight_decay:g}")
    n = f" --n {args.n_data}" if args.n_data else ""
    return (f"gradleak train --model {args.model} {options} --data {args.data}{n} --size {args.size} "
            f"--epochs {plan.epochs} --lr {plan.lr:g} {extra} --seed {args.seed} --out "
            f"runs/{_folder(args).name}/{recipe}").replace("  ", " ")


def _data(args) -> DataRequest:
    return DataRequest(args.data, n=args.n_data, size=args.size)


def trained(args, recipe: str):
    """The recipe's trained model (trained and cached on first use) and its training record."""
    out = _folder(args) / recipe
    spec = ModelSpec(args.model, json.loads(args.options), seed=args.seed)
    if not (out / "training.json").exists():
        started = time.perf_counter()
        result = train_model(spec, _data(args), _plan(args, recipe), out, quiet=True)
        record = json.loads((out / "training.json").read_text())
        record["command"] = train_command(args, recipe)
        (out / "training.json").write_text(json.dumps(record))
        print(f"{recipe}: trained in {time.perf_counter() - started:.0f} s, held-out accuracy "
              f"{result.held_out_accuracy:.3f}  ({record['command']})", flush=True)
    record = json.loads((out / "training.json").read_text())
    module = spec.with_(weights=out / "weights.safetensors").build(tuple(record["input_shape"]),
                                                                   record["num_classes"]).module
    return module, record


def network(args, name: str):
    """``untrained`` (the recipes' initialisation) or a recipe's trained model, and a training record."""
    if name != "untrained":
        return trained(args, name)
    module, record = trained(args, "sgd")   # any recipe: the split and the normalization are the data's
    spec = ModelSpec(args.model, json.loads(args.options), seed=args.seed)
    return spec.build(tuple(record["input_shape"]), record["num_classes"]).module, record


def targets(args, record) -> list[tuple[str, list[int]]]:
    """(image set, indices) attacked: the held-out split from ``--tune`` on, then photos 8 and 9."""
    if args.tuning:   # the images reserved for tuning attack settings, never reported as results
        return [("tune", record["held_out_indices"][:args.tune])]
    if args.images:   # diagnosis on chosen images (training images: never reported as held-out results)
        held = set(record["held_out_indices"])
        return [(CHOSEN_HELD_OUT if set(args.images) <= held else "chosen", list(args.images))]
    held = record["held_out_indices"][args.tune:args.tune + args.n]
    sets = [("held-out", held)]
    channels = record["input_shape"][0]
    if args.photos and record["num_classes"] == 10 and len(held) >= 1:
        sets.append((f"photos{'-gray' if channels == 1 else ''}", list(PHOTOS)))
    if args.sets:   # only these image sets (e.g. photos-gray)
        sets = [s for s in sets if s[0] in args.sets]
    return sets


def _images(args, record, which: str, indices: list[int]):
    channels = record["input_shape"][0]
    if which.startswith("photos"):
        photos = load_builtin("photos", size=args.size)
        images = photos.images[indices]
        if channels == 1:   # ITU-R 601 luma, as load_photos(channels=1)
            images = (0.299 * images[:, :1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
        return images, torch.tensor(indices) % record["num_classes"]
    dataset = _data(args).load()
    return dataset.images[indices], dataset.labels[indices]


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def _load_average() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def flat_starts(how: str | None, images):
    """Diagnosis only: every restart starts from a flat image instead of the attack's ``randn``.
    ``oracle``: at the true batch's mean brightness (uses the truth: never an attack result);
    ``spread``: odd restarts flat at 0.5, 0.25, 0.75, 0.125, ... (van der Corput), even ones ``randn``;
    ``truth+S``: the true images plus Gaussian noise of standard deviation S (pixel scale; uses the
    truth): how wide the true image's basin is."""
    if how is None:
        yield
        return
    import gradleak.attacks._engine as engine

    original = engine._initial

    def level(k: int) -> float:
        value, step = 0.0, 0.5
        while k:
            value, k, step = value + step * (k & 1), k >> 1, step / 2
        return value

    def start(cfg, restart, shape, spec, dtype, device):
        if how == "spread" and restart % 2 == 0:
            return original(cfg, restart, shape, spec, dtype, device)
        if how.startswith("truth+"):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(restart), dtype=dtype)
            return spec.normalize((images.to(dtype) + float(how[6:]) * noise).clamp(0, 1)).to(device)
        v = float(images.mean()) if how == "oracle" else level((restart + 1) // 2)
        return spec.normalize(torch.full(shape, v, dtype=dtype)).to(device)

    engine._initial = start
    try:
        yield
    finally:
        engine._initial = original


def attack_one(module, record, images, labels, mode: str, options: dict, *, attacker_dtype=None, bn_prior=False,
               flat=None):
    """One FedSGD update of ``images`` (the training set's normalization), attacked; per-image scores.
    ``attacker_dtype``: the attacker computes in this precision (the client's update stays float32);
    ``bn_prior``: the attacker uses the model's BatchNorm running statistics as a prior (``bn`` option);
    ``flat``: diagnosis-only flat starts (:func:`flat_starts`)."""
    module.train(mode == "train")
    data_spec = gl.DataSpec(tuple(record["data_spec"]["mean"]), tuple(record["data_spec"]["std"]))
    client = update = gl.fedsgd_update(module, images, labels, spec=data_spec)
    attacked = module
    if attacker_dtype is not None:
        attacked = copy.deepcopy(module).to(attacker_dtype).train(mode == "train")
        update = update.to(attacker_dtype)
    kwargs = {k: v for k, v in options.items() if k not in ("attack", "as_batch")}
    if options.get("as_batch"):   # reconstruct fewer images than the batch: those that carry the update
        kwargs["carried"] = options["as_batch"]
    attack = gl.get_attack(options.get("attack", "inverting-gradients"))(
        attacked, gl.ThreatModel(bn_statistics=bn_prior), **kwargs)
    started = time.perf_counter()
    with flat_starts(flat, images):
        rec = attack.reconstruct(update)
    rec.images = rec.images.float()
    seconds = time.perf_counter() - started
    scores = score(rec.images, images, predicted_labels=rec.labels, true_labels=labels, use_lpips=False)
    rows = sorted(scores.per_image, key=lambda r: r["index"])
    losses = [v for k, v in rec.history.items() if k.startswith("loss")]
    final_loss = min(min(s["y"]) for s in losses) if losses else None
    returned = [float(m.group(1)) for m in map(RETURNED_LOSS.search, rec.notes) if m]
    with torch.no_grad():
        module.eval()
        probs = torch.softmax(module(data_spec.normalize(images)), -1)
    return {"psnr": [r["psnr"] for r in rows], "ssim": [r["ssim"] for r in rows],
            "matched_to": [r["matched_to"] for r in rows], "label_accuracy": scores.summary.get("label_accuracy"),
            "matching_loss": final_loss, "returned_loss": returned[-1] if returned else None, "seconds": seconds,
            "loss_curve": {k: v for k, v in rec.history.items() if "loss" in k and isinstance(v, dict)},
            "true_class_probability": probs[torch.arange(len(labels)), labels].tolist(),
            "update_norm": float(torch.sqrt(sum(t.pow(2).sum() for t in update.tensors.values()))),
            **batch_shares(module.train(mode == "train"), client, images, labels, rec, rows),
            "notes": rec.notes}, rec.images


def batch_shares(module, update, images, labels, rec, rows) -> dict:
    """Eval mode, batches of 2 or more: each original's share of the client's update and the share of the
    reconstruction matched to it in the update its reconstructed batch produces (truth-free; gradleak.shares)."""
    if module.training or len(labels) < 2:
        return {}
    own = update_shares(module, update, rec.images.to(images.dtype), rec.labels).tolist()
    return {"true_shares": update_shares(module, update, images, labels).tolist(),
            "reconstruction_shares": [None if r["matched_to"] is None else own[r["matched_to"]] for r in rows]}


def attack(args):
    options = {"iterations": args.iterations, "record_every": 50, **json.loads(args.attack_options)}
    folder = _folder(args)
    log = folder / f"attacks-{args.tag}.jsonl"
    store = folder / "reconstructions"
    store.mkdir(parents=True, exist_ok=True)
    for net in args.nets:
        module, record = network(args, net)
        for which, indices in targets(args, record):
            images_all, labels_all = _images(args, record, which, indices)
            for mode in args.modes:
                for batch in args.batches:
                    if which.startswith("photos") and batch > 1:
                        continue
                    for start in range(0, len(indices) - batch + 1, batch):
                        key = f"{net}|{mode}|b{batch}|{which}|{','.join(map(str, indices[start:start + batch]))}"
                        if key in _done(log):
                            continue
                        load = _load_average()
                        dtype = getattr(torch, args.attacker_dtype) if args.attacker_dtype else None
                        row, rec = attack_one(module, record, images_all[start:start + batch],
                                              labels_all[start:start + batch], mode, options, flat=args.flat,
                                              attacker_dtype=dtype, bn_prior=args.bn_prior)
                        row.update(key=key, net=net, mode=mode, batch=batch, set=which,
                                   indices=indices[start:start + batch], tag=args.tag, options=options,
                                   load_before=load, load_after=_load_average(), data=str(args.data), model=args.model,
                                   model_options=json.loads(args.options), train_command=record.get("command"),
                                   held_out_accuracy=record["held_out_accuracy"])
                        torch.save(rec.detach().clone(), store / f"{args.tag}-{key.replace('|', '_')}.pt")
                        with log.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{key:48s} PSNR {', '.join('-' if p is None else f'{p:.1f}' for p in row['psnr'])}  loss "
                              f"{row['matching_loss']:.4f}  {row['seconds']:.0f} s  load {load:.1f}", flush=True)


def rows_of(folder: Path, tag: str) -> list[dict]:
    """The attacks logged under ``tag``; where no log has that name, ``A+B`` is the attacker's own choice per
    attack between the variants A and B: the one with the lower matching loss (no ground truth), kept only
    where every variant ran. ``A+B+C?``: C is a rerun of chosen attacks (``--images``): compared where it ran.
    Chosen held-out images count as the held-out images they are."""
    log = folder / f"attacks-{tag.rstrip('?')}.jsonl"
    if log.exists():
        return [_as_held_out(json.loads(line)) for line in log.read_text().splitlines() if line.strip()]
    if "+" not in tag:
        return []
    parts = tag.split("+")
    variants = [{row["key"]: row for row in rows_of(folder, t)} for t in parts]
    needed = [v for v, t in zip(variants, parts) if not t.endswith("?")]
    if not needed:
        raise SystemExit(f"--tag {tag}: every variant is marked '?'; name at least one that ran on every attack")
    shared = [k for k in needed[0] if all(k in v for v in needed[1:])]
    return [min(rows, key=lambda row: row[_loss_key(rows)])
            for rows in ([v[k] for v in variants if k in v] for k in shared)]


def _as_held_out(row: dict) -> dict:
    """A row of ``--images`` on held-out images, keyed as the held-out attack it repeats (its file keeps
    the key it was saved under)."""
    if row.get("set") == CHOSEN_HELD_OUT:
        key = row["key"].replace(f"|{CHOSEN_HELD_OUT}|", "|held-out|")
        row = {**row, "file": row["key"], "set": "held-out", "key": key}
    return row


def _loss_key(rows: list[dict]) -> str:
    """Compare the returned iterates' losses where every variant logged one (runs from 2026-12-03 on),
    otherwise the recorded histories' minima (every 50 iterations), so that one rule judges all variants."""
    return "returned_loss" if all(row.get("returned_loss") is not None for row in rows) else "matching_loss"


def cells(rows: list[dict]) -> dict[tuple, dict]:
    """Per (net, mode, batch, image set): per-image PSNR in image order, mean, median, share >= 18 dB."""
    out: dict[tuple, dict] = {}
    for row in rows:
        cell = out.setdefault((row["net"], row["mode"], row["batch"], row["set"]),
                              {"psnr": [], "ssim": [], "indices": [], "seconds": [], "load": [], "labels": []})
        cell["psnr"] += row["psnr"]
        cell["ssim"] += row["ssim"]
        cell["indices"] += row["indices"]
        cell["seconds"].append(row["seconds"])
        cell["load"].append(row["load_before"])
        cell["labels"].append(row["label_accuracy"])
    for cell in out.values():
        p = cell["psnr"]
        cell.update(n=len(p), mean=statistics.fmean(p), median=statistics.median(p),
                    recognisable=sum(v >= 18 for v in p), ssim_mean=statistics.fmean(cell["ssim"]))
    return out


def table(args):
    order = ["untrained", *RECIPES]
    for data in args.data_sets:
        args.data = data
        folder = _folder(args)
        summary = cells(rows_of(folder, args.tag))
        if not summary:
            continue
        print(f"\n### {data}, {args.model} {args.options}, attack tag {args.tag}\n")
        print("| image set | BN mode | batch | network | n | mean PSNR | median | >= 18 dB | SSIM | trained - untrained "
              "| s/attack | load |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in sorted(summary, key=lambda k: (k[3], k[1], k[2], order.index(k[0]) if k[0] in order else 99)):
            net, mode, batch, which = key
            cell = summary[key]
            base = summary.get(("untrained", mode, batch, which))
            diff = "" if base is None or net == "untrained" else f"{cell['mean'] - base['mean']:+.1f}"
            print(f"| {which} | {mode} | {batch} | {net} | {cell['n']} | {cell['mean']:.1f} | {cell['median']:.1f} | "
                  f"{cell['recognisable']}/{cell['n']} | {cell['ssim_mean']:.2f} | {diff} | "
                  f"{statistics.fmean(cell['seconds']):.0f} | {min(cell['load']):.1f}-{max(cell['load']):.1f} |")
        (folder / f"table-{args.tag}.json").write_text(json.dumps(
            {"|".join(map(str, k)): v for k, v in summary.items()}, indent=1))


def figure(args):
    """Originals, then one row per ``NET:TAG`` of ``--rows`` (held-out images, one mode and batch)."""
    from matplotlib.figure import Figure

    folder = _folder(args)
    rows = []
    for item in args.rows:
        net, tag = item.split(":")
        found = {tuple(r["indices"]): r for r in rows_of(folder, tag) if r["net"] == net and r["mode"] == args.modes[0]
                 and r["batch"] == args.batches[0] and r["set"] == "held-out"}
        rows.append((f"{net}\n{tag}", found, tag))
    common = sorted(set.intersection(*[set(found) for _, found, _ in rows]), key=lambda k: rows[0][1][k]["key"])
    order = [k for k in rows[0][1] if k in common][:args.columns]
    _, record = network(args, "untrained")
    images = torch.cat([_images(args, record, "held-out", list(k))[0] for k in order])
    fig = Figure(figsize=(0.9 * len(images) + 1.0, 1.0 * (len(rows) + 1) + 0.4), dpi=110)
    axes = fig.subplots(len(rows) + 1, len(images), squeeze=False)
    for c in range(len(images)):
        axes[0][c].imshow(images[c, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for r, (name, found, tag) in enumerate(rows, start=1):
        c = 0
        for k in order:
            row = found[k]
            saved = row.get("file", row["key"]).replace("|", "_")
            rec = torch.load(folder / "reconstructions" / f"{row['tag']}-{saved}.pt")
            for j, m in enumerate(row["matched_to"]):   # per original; None: not reconstructed (carried)
                if m is not None:
                    axes[r][c].imshow(rec[m, 0].clamp(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                axes[r][c].set_title("-" if m is None else f"{row['psnr'][j]:.1f}", fontsize=6, pad=1)
                c += 1
        axes[r][0].set_ylabel(name.replace("+", "+\n"), fontsize=5)   # long choices (A+B+C) wrap at each +
    axes[0][0].set_ylabel("original", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{args.data}, {args.model} {args.options}, {args.modes[0]}-mode BatchNorm, batch {args.batches[0]} "
                 "(held-out images; PSNR dB)", fontsize=7)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.22 / fig.get_figheight()))   # room for the title
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("train", "attack", "table", "figure"))
    parser.add_argument("--data", default="faces", help="faces, digits or a path (CIFAR batches, image folder)")
    parser.add_argument("--data-sets", nargs="+", default=["faces", "digits"], help="table: the data sets")
    parser.add_argument("--n-data", type=int, default=None, help="images of the data set (default: all)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--options", default='{"width": 16}', help="model options as JSON")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override the data set's epochs/rounds")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--nets", nargs="+", default=["untrained", *RECIPES])
    parser.add_argument("--modes", nargs="+", default=["eval"], choices=("eval", "train"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--n", type=int, default=16, help="held-out images attacked per cell")
    parser.add_argument("--tune", type=int, default=2, help="held-out images reserved for tuning (skipped)")
    parser.add_argument("--tuning", action="store_true", help="attack the tuning images instead (sweeps)")
    parser.add_argument("--sets", nargs="+", default=None, help="attack only these image sets (held-out, photos-gray)")
    parser.add_argument("--images", type=lambda v: [int(i) for i in v.split(",")], default=None,
                        help="diagnosis: attack these data set indices (e.g. training images) instead")
    parser.add_argument("--attacker-dtype", choices=("float32", "float64"), default=None,
                        help="the attacker's precision (the client's update stays float32)")
    parser.add_argument("--bn-prior", action="store_true", help="the attacker's BatchNorm running-statistics prior "
                        "(give the weight with --attack-options '{\"bn\": 0.1}')")
    parser.add_argument("--flat", default=None, help="diagnosis: flat starts (oracle: at the true mean brightness; "
                        "spread: half of the restarts flat at spread levels; truth+S: the truth plus noise S)")
    parser.add_argument("--no-photos", dest="photos", action="store_false", help="skip photos 8 and 9")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--attack-options", default="{}", help="attack options as JSON (key 'attack': its name)")
    parser.add_argument("--tag", default="default", help="names the attack variant in the results (table/figure: "
                        "A+B = per attack the variant with the lower matching loss; C?: a rerun compared where it ran)")
    parser.add_argument("--rows", nargs="+", default=["untrained:default", "sgd:default"], help="figure: NET:TAG rows")
    parser.add_argument("--columns", type=int, default=16, help="figure: images shown")
    parser.add_argument("--out", default="trained-grid.png", help="figure: the PNG written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "train":
        for recipe in args.recipes:
            trained(args, recipe)
    elif args.what == "attack":
        attack(args)
    elif args.what == "figure":
        figure(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
