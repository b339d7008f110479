"""Why an attack does better or worse on a trained network: measurements, per network and image.

    python benchmarks/trained_diagnose.py --data digits [--nets untrained sgd adam] [--n 16]

For each network of ``benchmarks/trained_grid.py`` (the same cached models, the same held-out
images, eval-mode BatchNorm, batch 1, the training set's normalization) and each image:

- ``p``: the model's probability of the true class, and ``exact_one``: whether float32 rounds
  it to 1 (then the client's ``softmax - onehot`` has a true-class entry of exactly 0);
- ``norm``: the norm of the client's gradient; ``bias_share``: the classifier bias gradient's
  share of its squared norm; ``top``: the entry holding the largest share;
- ``modules``: each module's share of that squared norm (the stem, each residual stage, the
  classifier; a ConvNet's numbered layers): where the client's gradient lives, layer by layer;
- ``cos32``: the cosine between the client's float32 gradient and the same gradient in float64
  (what float32 rounding of a confident softmax does to the direction the attack matches);
- ``contrast``: the Inverting Gradients matching loss (1 - cosine, no TV) of a random candidate
  (the attack's own seeded ``randn`` start) and of another held-out image: how strongly the
  objective tells images apart (0: not at all);
- ``tv_share``: at the random start, the share of pixels whose matching-loss gradient is larger
  than the TV term's (TV 1e-2): below one half, the signed step is mostly TV's;
- the same contrast with ``output_gradient="observed"`` (``contrast_obs``).

Prints one line per image and the medians per network; writes
``benchmarks/results/trained-grid/<data>-<model>/diagnose.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trained_grid as tg  # noqa: E402  (benchmarks/trained_grid.py)

import gradleak as gl  # noqa: E402
from gradleak.attacks.matching import total_variation  # noqa: E402


def _flat(tensors: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).double() for n in names])


def _loss(problem, x: torch.Tensor) -> float:
    return float(problem.objective(x, None, functional=False).detach())


def measure(module, record, x, y, other) -> dict:
    spec = gl.DataSpec(tuple(record["data_spec"]["mean"]), tuple(record["data_spec"]["std"]))
    module.eval()
    update = gl.fedsgd_update(module, x, y, spec=spec)
    update64 = gl.fedsgd_update(copy.deepcopy(module).double(), x.double(), y, spec=spec)
    names = list(update.tensors)
    g32, g64 = _flat(update.tensors, names), _flat(update64.tensors, names)
    shares = {n: float(update.tensors[n].double().pow(2).sum() / g32.pow(2).sum().clamp_min(1e-300)) for n in names}
    with torch.no_grad():
        p = torch.softmax(module(spec.normalize(x)), -1)[0, y[0]]
    modules: dict[str, float] = {}
    for name, share in shares.items():   # "stages.1.0.conv1.weight" -> "stages.1", "fc.bias" -> "fc"
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        modules[key] = modules.get(key, 0.0) + share
    row = {"p": float(p), "exact_one": bool(p == 1), "norm": float(g32.norm()),
           "bias_share": shares.get("fc.bias", float("nan")), "top": max(shares, key=shares.get),
           "modules": {k: round(v, 4) for k, v in modules.items()},
           "cos32": float(g32 @ g64 / (g32.norm() * g64.norm()).clamp_min(1e-300))}
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))   # the engine's restart-0 start
    for tag, option in (("", "model"), ("_obs", "observed")):
        problem = gl.get_attack("inverting-gradients")(module, gl.ThreatModel(), tv=0.0,
                                                       output_gradient=option)._problem(update)
        row[f"contrast{tag}"] = _loss(problem, start)
        row[f"contrast_image{tag}"] = _loss(problem, spec.normalize(other))
        if not tag:
            candidate = start.clone().requires_grad_(True)
            match = torch.autograd.grad(problem.objective(candidate, None, functional=False), candidate)[0]
            candidate = start.clone().requires_grad_(True)
            tv = torch.autograd.grad(1e-2 * total_variation(candidate), candidate)[0]
            row["tv_share"] = float((match.abs() > tv.abs()).double().mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--options", default='{"width": 16}')
    parser.add_argument("--nets", nargs="+", default=["untrained", *tg.RECIPES])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tune", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, value in (("n_data", None), ("size", 32), ("seed", 0), ("test_fraction", 0.2), ("epochs", None),
                        ("photos", False), ("tuning", False), ("images", None), ("sets", None)):
        setattr(args, name, value)
    out: dict = {}
    for net in args.nets:
        module, record = tg.network(args, net)
        (_, indices), = tg.targets(args, record)
        images, labels = tg._images(args, record, "held-out", indices)
        rows = []
        for k, index in enumerate(indices):
            other = images[(k + 1) % len(indices)][None]
            row = {"index": index, **measure(module, record, images[k:k + 1], labels[k:k + 1], other)}
            rows.append(row)
            print(net, json.dumps({key: round(v, 6) if isinstance(v, float) else v for key, v in row.items()}),
                  flush=True)
        medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]
                   if isinstance(rows[0][key], float)}
        medians["exact_one"] = sum(r["exact_one"] for r in rows)
        out[net] = {"rows": rows, "median": medians}
        print(f"{net:10s} median " + ", ".join(f"{k} {v:.3g}" for k, v in medians.items()), flush=True)
    (tg._folder(args) / "diagnose.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
