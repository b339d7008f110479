"""Peeling a trained network's batch update: subtract the image that carries it, attack the rest.

    python benchmarks/batch_peeling.py --nets adam --how fitted     # the carried=1 reconstruction, least-squares scale
    python benchmarks/batch_peeling.py --nets adam --how oracle     # the true dominant image, exactly (diagnosis)

Needs ``trained_grid.py``'s digit networks and its ``carried=1`` batch-4 runs (tags ``as1``, ``as1-flat``,
``as1-smooth3``; per batch the lowest matching loss is the first stage). The second stage attacks the
residual update of the other B - 1 images with ``carried=1`` (random and flat starts, the lower loss):
``fitted`` removes the first reconstruction's gradient at the scale that best explains the update
(``u - a g(x1)``, ``a = <u, g> / ||g||^2``; the reconstruction's confidence, so its gradient's scale, is not the
image's); ``oracle`` removes the true dominant image's gradient exactly (``(B u - g_1) / (B - 1)``), which
bounds what peeling can reach. Prints and appends per batch the PSNR of the second image against each
original (``results/trained-grid/digits-.../peeling.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trained_grid as tg  # noqa: E402  (a sibling script)

import gradleak as gl  # noqa: E402
from gradleak.residual import simulate_update, update_shares  # noqa: E402

STAGE_ONE = ("as1", "as1-flat", "as1-smooth3")


def _psnr(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (x.float().clamp(0, 1) - truth).pow(2).mean()))


def _dot(u: dict, v: dict) -> float:
    return sum(float((u[n].double() * v[n].double()).sum()) for n in u)


def stage_one(folder: Path, key: str) -> torch.Tensor:
    """The ``carried=1`` reconstruction of the batch ``key`` with the lowest matching loss."""
    best = None
    for tag in STAGE_ONE:
        for line in (folder / f"attacks-{tag}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["key"] == key and (best is None or row["returned_loss"] < best[1]):
                best = (tag, row["returned_loss"])
    return torch.load(folder / "reconstructions" / f"{best[0]}-{key.replace('|', '_')}.pt")


def peel(module, update, images, labels, x1, how: str) -> dict:
    """The residual update of the other images and the second stage's result."""
    attack = gl.get_attack("inverting-gradients")
    if how == "oracle":
        dominant = int(update_shares(module, update, images, labels).argmax())
        g1 = simulate_update(module, update, images[dominant:dominant + 1], labels[dominant:dominant + 1])
        rest = {n: (len(labels) * update.tensors[n] - g1[n]) / (len(labels) - 1) for n in update.tensors}
    else:
        y1 = attack(module, gl.ThreatModel(), carried=1)._problem(update).labels
        g1 = simulate_update(module, update, x1.to(images.dtype), y1)
        scale = _dot(update.tensors, g1) / _dot(g1, g1)
        rest = {n: update.tensors[n] - scale * g1[n] for n in update.tensors}
    residual = replace(update, tensors=rest, batch_size=len(labels) - 1)
    best = None
    for init in ("randn", "flat"):
        started = time.perf_counter()
        rec = attack(module, gl.ThreatModel(), iterations=1500, record_every=50, carried=1, init=init).reconstruct(residual)
        loss = min(min(v["y"]) for k, v in rec.history.items() if k.startswith("loss"))
        if best is None or loss < best["loss"]:
            best = {"loss": loss, "init": init, "seconds": time.perf_counter() - started,
                    "psnr": [_psnr(rec.images, images[i:i + 1]) for i in range(len(labels))]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["adam"])
    parser.add_argument("--how", choices=("fitted", "oracle"), default="fitted")
    args = parser.parse_args()
    grid = argparse.Namespace(data="digits", model="convnet", options='{"width": 16}', seed=0, n_data=None, size=32,
                              recipes=list(tg.RECIPES), epochs=None, test_fraction=0.2)
    folder = tg._folder(grid)
    data = tg._data(grid).load()
    for net in args.nets:
        module, record = tg.network(grid, net)
        module.eval()
        spec = gl.DataSpec(tuple(record["data_spec"]["mean"]), tuple(record["data_spec"]["std"]))
        held = record["held_out_indices"][2:18]
        for start in range(0, 16, 4):
            idx = held[start:start + 4]
            key = f"{net}|eval|b4|held-out|{','.join(map(str, idx))}"
            images, labels = data.images[idx], data.labels[idx]
            update = gl.fedsgd_update(module, images, labels, spec=spec)
            x1 = stage_one(folder, key)
            row = {"key": key, "how": args.how, "true_shares": update_shares(module, update, images, labels).tolist(),
                   "first_psnr": [_psnr(x1, images[i:i + 1]) for i in range(4)],
                   **peel(module, update, images, labels, x1, args.how)}
            with (folder / "peeling.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key} {args.how}: shares {', '.join(f'{s:.3f}' for s in row['true_shares'])}; first "
                  f"{', '.join(f'{p:.1f}' for p in row['first_psnr'])}; second {', '.join(f'{p:.1f}' for p in row['psnr'])}"
                  f" (loss {row['loss']:.4f}, {row['init']})", flush=True)


if __name__ == "__main__":
    main()
