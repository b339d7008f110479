"""Do restarts rescue the trained networks' failed reconstructions, and does an early loss pick them?

    python benchmarks/trained_restarts.py --data faces --nets sgd sgd-nowd --seeds 4 [--tuning]

For each network of ``benchmarks/trained_grid.py`` (same cached models and images, eval-mode
BatchNorm, batch 1, Inverting Gradients at ``--iterations``) and each image, runs the attack from
``--seeds`` seeded starts, one at a time, and records per start: the matching loss at the recorded
iterations and the final PSNR. Prints per image the PSNR of each start, the PSNR of the start with the
lowest final loss (what ``restarts=R`` returns) and of the start with the lowest loss at each early
checkpoint (what keeping one start after that many iterations would return). Appends one JSON line per
image to ``benchmarks/results/trained-grid/<data>-<model>/restarts-<tag>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import trained_grid as tg  # noqa: E402  (benchmarks/trained_grid.py)

import gradleak as gl  # noqa: E402
from gradleak.metrics import score  # noqa: E402

CHECKPOINTS = (100, 200, 300, 500, 800)


def one_start(module, record, image, label, seed: int, options: dict):
    data_spec = gl.DataSpec(tuple(record["data_spec"]["mean"]), tuple(record["data_spec"]["std"]))
    module.eval()
    update = gl.fedsgd_update(module, image, label, spec=data_spec)
    attack = gl.get_attack("inverting-gradients")(module, gl.ThreatModel(), seed=seed, **options)
    rec = attack.reconstruct(update)
    psnr = score(rec.images, image, predicted_labels=rec.labels, true_labels=label, use_lpips=False).per_image[0]["psnr"]
    series = next(v for k, v in rec.history.items() if k.startswith("loss"))
    curve = dict(zip(series["x"], series["y"]))
    return psnr, curve, rec.images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="faces")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--options", default='{"width": 16}')
    parser.add_argument("--nets", nargs="+", default=["sgd"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tune", type=int, default=2)
    parser.add_argument("--tuning", action="store_true", help="the tuning images (never reported)")
    parser.add_argument("--attack-options", default="{}")
    parser.add_argument("--tag", default="r4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.n_data, args.size, args.seed, args.test_fraction, args.epochs, args.photos = None, 32, 0, 0.2, None, False
    args.sets = None
    options = {"iterations": args.iterations, "record_every": 50, **json.loads(args.attack_options)}
    log = tg._folder(args) / f"restarts-{args.tag}.jsonl"
    done = tg._done(log)
    for net in args.nets:
        module, record = tg.network(args, net)
        for which, indices in tg.targets(args, record):
            images, labels = tg._images(args, record, which, indices)
            for k, index in enumerate(indices):
                key = f"{net}|{which}|{index}"
                if key in done:
                    continue
                started = time.perf_counter()
                runs = [one_start(module, record, images[k:k + 1], labels[k:k + 1], s, options)
                        for s in range(args.seeds)]
                psnrs = [r[0] for r in runs]
                final = [min(r[1].values()) for r in runs]
                pick = {"final": psnrs[min(range(len(runs)), key=final.__getitem__)]}
                for c in CHECKPOINTS:
                    early = [min(v for i, v in r[1].items() if i <= c) for r in runs]
                    pick[str(c)] = psnrs[min(range(len(runs)), key=early.__getitem__)]
                row = {"key": key, "net": net, "set": which, "index": index, "psnr": psnrs, "final_loss": final,
                       "pick": pick, "seconds": time.perf_counter() - started, "options": options}
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{key:28s} starts {' '.join(f'{p:5.1f}' for p in psnrs)} | lowest final loss {pick['final']:.1f}"
                      f" | early picks {' '.join(f'{c}:{pick[str(c)]:.1f}' for c in CHECKPOINTS)}"
                      f" | {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
