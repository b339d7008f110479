"""The closed forms through defenses that only perturb the gradient (issue 13).

    .venv/bin/python benchmarks/robust_closed_forms.py [--data faces] [--n 4]

``fc-bias`` (batch 1) and ``qian`` (batch 1 and 4) on a one-hidden-layer ReLU MLP
(``--hidden`` units) through Gaussian noise of variance 1e-4 .. 1e-1 and layer-wise pruning
of 10 .. 90 % of the entries: mean PSNR of the robust estimate over ``--n`` images (updates
of batch 1, or ``--n`` images in batches of 4), and how many came out exactly (>= 60 dB).
The images are the last 4 built-in faces (``--start 196``: never tuned on).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile

import torch

import gradleak as gl
from gradleak.pipeline import DataRequest, attack_simulated

DEFENSES = ([None] + [f"gaussian:variance={v:g}" for v in (1e-4, 1e-3, 1e-2, 1e-1)]
            + [f"pruning:ratio={r:g}" for r in (0.1, 0.3, 0.5, 0.7, 0.9)])


def measure(attack: str, batch: int, defense: str | None, args) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as out:
        run = attack_simulated(attack, out, data=DataRequest(args.data, args.n, args.size, start=args.start),
                               model=gl.ModelSpec("mlp", {"hidden": str(args.hidden)}),
                               client=gl.ClientSetup(batch_size=batch), defenses=[defense] if defense else None,
                               quiet=True)
    psnrs = [r["psnr"] if r["psnr"] is not None else float("nan") for r in run.scores.per_image]
    finite = [min(p, 100.0) for p in psnrs if math.isfinite(p)]
    exact = sum(1 for p in psnrs if math.isfinite(p) and p >= 60)
    return (statistics.fmean(finite) if finite else float("nan")), exact, len(psnrs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="faces")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--start", type=int, default=196, help="first image (default: the last 4 faces)")
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = (("fc-bias", 1), ("qian", 1), ("qian", 4))
    print(f"{args.data} {args.size} px, MLP {args.hidden} ReLU units, {args.n} images; cells: mean PSNR dB "
          "(exact >= 60 dB / images)")
    print("| defense | " + " | ".join(f"{a} B={b}" for a, b in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for defense in DEFENSES:
        cells = []
        for attack, batch in cases:
            mean, exact, total = measure(attack, batch, defense, args)
            cells.append(f"{mean:.1f} ({exact}/{total})")
        print(f"| {defense or 'none'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
