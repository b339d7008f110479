"""Inverting Gradients, gradleak against the breaching library, side by side in one run.

    .venv/bin/python benchmarks/reference_side_by_side.py [--photos 8] [--cap 240] \
        [--gradleak-cap 600] [--reuse-breaching] [--breaching-python /tmp/breaching-venv/bin/python]

Both tools attack the same FedSGD gradient: the same ConvNet-64 (breaching's ``ConvNet``
layout: six 3x3 convolutions, a 3x3 max-pool, two more, a max-pool, a linear layer; every
convolution followed by BatchNorm and ReLU) with the same seeded weights copied into both,
in eval mode (breaching's honest server sends its buffers, so its user is in eval mode), the
same built-in photo at 32 px, normalized with breaching's CIFAR-10 mean and std, label
shared. Each tool runs its own default Inverting Gradients configuration (breaching: case
``1_single_image_small``, attack ``invertinggradients``, 24,000 iterations, TV 0.2; gradleak:
``inverting-gradients``, 4,800 iterations, TV 1e-2), one torch thread, one after the other;
``--cap`` seconds stops either earlier (breaching: the library's Ctrl-C path, which keeps its
best candidate; gradleak: ``time_budget``). breaching runs in its own virtual environment
(``benchmarks/_breaching_worker.py``; install: docs/performance.md); the driver checks that
its shared gradient equals gradleak's before comparing.

Prints PSNR of each tool's best candidate against wall time, seconds per iteration, and how
long gradleak takes to reach the PSNR breaching ends at (the ratio of the two wall times,
measured in this run). Writes benchmarks/results/reference_side_by_side.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench import Clock  # noqa: E402

import gradleak as gl  # noqa: E402
from gradleak._io import atomic_write_json  # noqa: E402
from gradleak.data import load_builtin  # noqa: E402
from gradleak.metrics import psnr  # noqa: E402

CIFAR10_MEAN = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
CIFAR10_STD = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)
RESULTS = Path(__file__).parent / "results"


class ReferenceConvNet(nn.Module):
    """The ConvNet of breaching's examples, with its parameter names (so one state dict
    loads into both): conv-BN-ReLU x6, max-pool 3, conv-BN-ReLU x2, max-pool 3, linear.
    (gradleak's zoo ``convnet`` has the same parameter shapes but pools after the fourth and
    sixth convolutions.)"""

    def __init__(self, width: int = 64, num_classes: int = 10, channels: int = 3):
        super().__init__()
        plan = [(channels, width), (width, 2 * width), (2 * width, 2 * width), (2 * width, 4 * width),
                (4 * width, 4 * width), (4 * width, 4 * width), "pool", (4 * width, 4 * width),
                (4 * width, 4 * width), "pool"]
        layers, k, p = [], 0, 0
        for step in plan:
            if step == "pool":
                layers.append((f"pool{p}", nn.MaxPool2d(3)))
                p += 1
                continue
            layers += [(f"conv{k}", nn.Conv2d(*step, kernel_size=3, padding=1)), (f"bn{k}", nn.BatchNorm2d(step[1])),
                       (f"relu{k}", nn.ReLU())]
            k += 1
        layers += [("flatten", nn.Flatten()), ("linear", nn.Linear(36 * width, num_classes))]
        self.model = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def run_breaching(python: str, state, image, label, cap: float, every: int, work: Path) -> dict:
    source, target = work / "job.pt", work / "result.pt"
    torch.save({"state": state, "images": image, "labels": label, "cap": cap, "record_every": every, "threads": 1},
               source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    subprocess.run([python, str(Path(__file__).parent / "_breaching_worker.py"), str(source), str(target)],
                   check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
    return torch.load(target, weights_only=False)


def run_gradleak(model, image, label, cap: float, every: int) -> dict:
    spec = gl.DataSpec(CIFAR10_MEAN, CIFAR10_STD)
    update = gl.fedsgd_update(model, image, label, spec=spec, share_labels=True)
    clock = Clock(image)
    attack = gl.get_attack("inverting-gradients")(model, gl.ThreatModel(labels_known=True), time_budget=cap,
                                                 record_every=every)
    result = attack.reconstruct(update, monitor=clock.monitor, progress=clock.progress)
    seconds = time.perf_counter() - clock.start - clock.overhead
    history = result.history
    curve = [{"iteration": i + 1, "seconds": s, "psnr": q} for i, s, q in
             zip(history["psnr"]["x"], history["seconds"]["y"], history["psnr"]["y"])]
    return {"curve": curve, "images": result.images, "iterations": len(clock.steps), "seconds": seconds,
            "gradient": list(update.tensors.values()), "max_iterations": attack.config.iterations,
            "tv": attack.config.tv}


def _psnr_at(curve: list[dict], seconds: float) -> float | None:
    seen = [p["psnr"] for p in curve if p["seconds"] <= seconds]
    return seen[-1] if seen else None


def _seconds_to(curve: list[dict], level: float) -> float | None:
    return next((p["seconds"] for p in curve if p["psnr"] >= level), None)


def compare(name: str, image, label, args, work: Path) -> dict:
    torch.manual_seed(args.seed)
    model = ReferenceConvNet(args.width).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stored = RESULTS / f"breaching-{name}-cap{int(args.cap)}-seed{args.seed}.pt"
    if args.reuse_breaching and stored.exists():
        ref = torch.load(stored, weights_only=False)
    else:
        ref = run_breaching(args.breaching_python, state, image, label, args.cap, args.record_every, work)
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save(ref, stored)  # a 2-hour run is kept even if the gradleak half is interrupted
    ours = run_gradleak(model, image, label, args.gradleak_cap or args.cap, args.record_every)
    gap = max(float((a - b).abs().max()) for a, b in zip(ref["gradient"], ours["gradient"]))
    if gap > 1e-4:
        raise SystemExit(f"{name}: the two shared gradients differ by {gap:.3g}: not the same model or image")
    row = {"photo": name, "gradient_max_abs_difference": gap, "cap_seconds": args.cap, "load": os.getloadavg()}
    for tool, run in (("breaching", ref), ("gradleak", ours)):
        final = float(psnr(run["images"], image).mean())
        row[tool] = {"final_psnr": final, "iterations": run["iterations"], "seconds": run["seconds"],
                     "seconds_per_iteration": run["seconds"] / max(run["iterations"], 1),
                     "max_iterations": run["max_iterations"], "tv": run["tv"], "curve": run["curve"]}
    target = row["breaching"]["final_psnr"]
    reached = _seconds_to(ours["curve"], target)
    row["gradleak_seconds_to_breaching_final"] = reached
    row["wall_time_ratio"] = None if reached is None else row["breaching"]["seconds"] / reached
    return row


def report(row: dict) -> None:
    b, g = row["breaching"], row["gradleak"]
    print(f"\n{row['photo']} (shared gradients agree to {row['gradient_max_abs_difference']:.1e}; "
          f"load {row['load'][0]:.2f})")
    print(f"{'tool':10s} {'iterations':>10s} {'of':>7s} {'s/it':>7s} {'seconds':>8s} {'final PSNR':>10s}")
    for tool, r in (("breaching", b), ("gradleak", g)):
        print(f"{tool:10s} {r['iterations']:>10d} {r['max_iterations']:>7d} {r['seconds_per_iteration']:7.3f} "
              f"{r['seconds']:8.1f} {r['final_psnr']:10.2f}")
    marks = [t for t in (15, 30, 60, 120, 180, 240, 300, 600, 1200, 2400, 4800) if t <= row["cap_seconds"]]
    print("PSNR at  " + " ".join(f"{t:>6d}s" for t in marks))
    for tool, r in (("breaching", b), ("gradleak", g)):
        cells = [_psnr_at(r["curve"], t) for t in marks]
        print(f"{tool:9s}" + " ".join("      -" if c is None else f"{c:7.2f}" for c in cells))
    reached = row["gradleak_seconds_to_breaching_final"]
    print(f"gradleak reaches breaching's final {b['final_psnr']:.2f} dB "
          + ("never in its run" if reached is None else f"after {reached:.1f} s ({row['wall_time_ratio']:.1f}x less wall time)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, nargs="+", default=[8], help="built-in photo indices (8, 9: held out)")
    parser.add_argument("--cap", type=float, default=240.0, help="seconds each tool may run per image")
    parser.add_argument("--gradleak-cap", type=float, default=None, help="seconds gradleak may run (default: --cap)")
    parser.add_argument("--reuse-breaching", action="store_true",
                        help="reuse breaching's stored run of the same photo, cap and seed (benchmarks/results/)")
    parser.add_argument("--record-every", type=int, default=50)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the ConvNet's weights")
    parser.add_argument("--breaching-python", default="/tmp/breaching-venv/bin/python")
    parser.add_argument("--out", default=str(RESULTS / "reference_side_by_side.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = load_builtin("photos", size=32)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for k in args.photos:
            rows.append(compare(photos.classes[k], photos.images[k:k + 1], photos.labels[k:k + 1], args, Path(work)))
            report(rows[-1])
    atomic_write_json(args.out, {"cap_seconds": args.cap, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
