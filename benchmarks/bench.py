"""One benchmark runner for the attacks: speed, memory and time to quality, case by case.

    .venv/bin/python benchmarks/bench.py [--quick] [--case NAME ...] [--device cpu] [--threads 1]

Cases (``--list`` prints them): DLG on LeNet at 32 px, batch 1; Inverting Gradients on
ConvNet-64 and on the CIFAR ResNet-18 at 32 px, batch 1 and 8 (eval-mode BatchNorm);
FedAvg inversion of 4 images after 4 local steps; R-GAP on CNN6; the closed forms
(fc-bias, Qian) on an MLP at 224 px. Every case attacks built-in photos (astronaut, chelsea,
coffee, rocket, hubble_deep_field, immunohistochemistry, retina, china: photos 0-7).
Photos 8 and 9 (flower, grace_hopper) are held out: no case uses them and nothing is tuned
on them, so time-to-quality changes can be judged there (``--start 8``).

Per case: seconds per iteration (median of the iterations after two of warm-up; one
iteration of DLG is one L-BFGS step, up to 20 evaluations), wall seconds of the attack,
peak memory (CPU: the case runs in its own process and reports its peak RSS and the growth
during the attack; CUDA: ``torch.cuda.max_memory_allocated``), PSNR/SSIM of the best
iterate against iterations and seconds (through the attack's monitor hook, its own cost
subtracted), the seconds to reach the case's PSNR target, and the seconds to come within
0.5 dB of the run's final PSNR. Prints a table; writes JSON to
``benchmarks/results/bench[-quick].json``. ``--quick`` caps every iterative case at a few
iterations so the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTLED_DB = 0.5


@dataclass(frozen=True)
class Case:
    name: str
    attack: str
    model: str
    model_options: dict = field(default_factory=dict)
    batch: int = 1
    side: int = 32
    iterations: int | None = None     # full budget (None: the attack's own default or not iterative)
    quick: int | None = None          # budget under --quick
    target_db: float = 20.0           # PSNR target for "seconds to target"
    fedavg: tuple[int, float] | None = None  # (local steps, local lr)
    labels_known: bool = False
    binary: bool = False              # 0/1 labels for a one-logit head (R-GAP's CNN6)


CASES = [
    Case("dlg-lenet-b1", "dlg", "lenet", iterations=300, quick=60, target_db=30.0),
    Case("ig-convnet64-b1", "inverting-gradients", "convnet", {"width": 64}, quick=60, target_db=15.0),
    Case("ig-convnet64-b8", "inverting-gradients", "convnet", {"width": 64}, batch=8, quick=15, target_db=12.0),
    Case("ig-resnet18-b1", "inverting-gradients", "resnet18", quick=30, target_db=15.0),
    Case("ig-resnet18-b8", "inverting-gradients", "resnet18", batch=8, quick=8, target_db=12.0),
    Case("fedavg-convnet32-b4-k4", "fedavg", "convnet", {"width": 32}, batch=4, quick=20, target_db=12.0,
         fedavg=(4, 0.01)),
    Case("rgap-cnn6-b1", "rgap", "cnn6", labels_known=True, binary=True, target_db=40.0),
    Case("fc-bias-mlp-224-b1", "fc-bias", "mlp", {"hidden": "256"}, side=224, target_db=60.0),
    Case("qian-mlp-224-b4", "qian", "mlp", {"hidden": "256"}, batch=4, side=224, target_db=60.0),
]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Progress and monitor hooks that time the attack: iteration timestamps, and PSNR/SSIM
    of the best iterate with the seconds spent so far, the monitor's own cost excluded."""

    def __init__(self, truth):
        from gradleak.pipeline import psnr_monitor

        self.psnr, self.truth = psnr_monitor(truth), truth
        self.start, self.overhead, self.steps = time.perf_counter(), 0.0, []

    def progress(self, done: int, total: int) -> None:
        self.steps.append(time.perf_counter() - self.overhead)

    def monitor(self, images):
        from gradleak.metrics import match, ssim

        entered = time.perf_counter()
        out = self.psnr(images)
        out["ssim"] = float(ssim(images[match(images, self.truth)], self.truth).mean())
        out["seconds"] = entered - self.start - self.overhead
        self.overhead += time.perf_counter() - entered
        return out


def _curve(history: dict) -> list[dict]:
    """[{iteration, seconds, psnr, ssim}] from a restart's history (one restart per case)."""
    if "psnr" not in history:
        return []
    its = history["psnr"]["x"]
    return [{"iteration": i, "seconds": s, "psnr": p, "ssim": q} for i, s, p, q in
            zip(its, history["seconds"]["y"], history["psnr"]["y"], history["ssim"]["y"])]


def _first(curve: list[dict], level: float) -> dict | None:
    return next((point for point in curve if point["psnr"] >= level), None)


def run_case(case: Case, quick: bool, device: str, threads: int, start: int, time_budget: float | None = None) -> dict:
    """Run one case in this process; returns its figures (JSON-able). ``time_budget``: stop an
    iterative attack after this many seconds (``benchmarks/gpu_check.py`` keeps its run bounded)."""
    import torch

    torch.set_num_threads(threads)
    import gradleak as gl
    from gradleak.data import load_builtin
    from gradleak.metrics import match, psnr, ssim

    photos = load_builtin("photos", size=case.side, n=start + case.batch)
    images = photos.images[start:start + case.batch]
    labels = photos.labels[start:start + case.batch] % 2 if case.binary else photos.labels[start:start + case.batch]
    built = gl.ModelSpec(case.model, case.model_options, device=device, mode="eval").build(
        (3, case.side, case.side), 10)
    images, labels = images.to(built.device), labels.to(built.device)
    spec = gl.DataSpec.from_images(images) if case.binary else None
    if case.fedavg:
        update = gl.fedavg_update(built.module, images, labels, lr=case.fedavg[1], local_steps=case.fedavg[0],
                                  loss=built.loss, share_labels=case.labels_known)
    else:
        update = gl.fedsgd_update(built.module, images, labels, loss=built.loss, spec=spec,
                                  share_labels=case.labels_known)
    iterations = case.quick if quick and case.quick else case.iterations
    options = {} if iterations is None else {"iterations": iterations,
                                             "record_every": max(1, min(50, iterations // 20))}
    if time_budget is not None and iterations is not None:
        options["time_budget"] = time_budget
    attack = gl.get_attack(case.attack)(built.module, gl.ThreatModel(labels_known=case.labels_known), **options)
    cuda = built.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = _rss_mb()
    clock = Clock(images)
    result = attack.reconstruct(update, monitor=clock.monitor, progress=clock.progress)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.start - clock.overhead
    steps = [b - a for a, b in zip(clock.steps[2:], clock.steps[3:])]
    final_psnr = final_ssim = None
    if result.images is not None:
        perm = match(result.images, images)
        final_psnr = float(psnr(result.images[perm], images).clamp(max=100).mean())
        final_ssim = float(ssim(result.images[perm], images).mean())
    curve = _curve(result.history)
    if not curve and final_psnr is not None:  # not iterative: the result comes at the end
        curve = [{"iteration": None, "seconds": seconds, "psnr": final_psnr, "ssim": final_ssim}]
    target = _first(curve, case.target_db)
    settled = _first(curve, final_psnr - SETTLED_DB) if final_psnr is not None else None
    return {
        **asdict(case), "quick_run": quick, "time_budget": time_budget, "device": str(built.device), "threads": threads, "images_from": start,
        "iterations_run": len(clock.steps) or None,
        "seconds_per_iteration": statistics.median(steps) if steps else None,
        "seconds": seconds, "psnr": final_psnr, "ssim": final_ssim,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb(),
        "attack_memory_growth_mb": None if cuda else max(0.0, _peak_rss_mb() - rss),
        "seconds_to_target": None if target is None else target["seconds"],
        "iterations_to_target": None if target is None else target["iteration"],
        "seconds_to_settle": None if settled is None else settled["seconds"],
        "curve": curve, "notes": result.notes,
    }


def _isolated(case: Case, args) -> dict:
    """The case in a fresh process, so that its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_case, case, args.quick, args.device, args.threads, args.start).result()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| case | iterations | s/iteration | seconds | peak MB (growth) | PSNR dB | SSIM | target dB "
            "| s to target | s to within 0.5 dB of final |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        memory = _fmt(r["peak_memory_mb"], ".0f") + (
            "" if r["attack_memory_growth_mb"] is None else f" (+{r['attack_memory_growth_mb']:.0f})")
        lines.append(f"| {r['name']} | {_fmt(r['iterations_run'], 'd')} | {_fmt(r['seconds_per_iteration'], '.4f')} "
                     f"| {r['seconds']:.1f} | {memory} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.3f')} "
                     f"| {r['target_db']:g} | {_fmt(r['seconds_to_target'], '.1f')} | {_fmt(r['seconds_to_settle'], '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few iterations per iterative case")
    parser.add_argument("--case", nargs="+", choices=[c.name for c in CASES], help="run only these cases")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each case")
    parser.add_argument("--start", type=int, default=0, help="first photo (8: the held-out photos, batch <= 2)")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench[-quick].json)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    if args.list:
        for c in CASES:
            print(f"{c.name:24s} {c.attack} on {c.model} {c.model_options or ''} {c.side} px, batch {c.batch}")
        return
    import os

    from gradleak._io import atomic_write_json

    rows = []
    for case in [c for c in CASES if not args.case or c.name in args.case]:
        rows.append(_isolated(case, args))
        r = rows[-1]
        print(f"{case.name}: {r['seconds']:.1f} s, PSNR {_fmt(r['psnr'], '.2f')} dB, load {os.getloadavg()[0]:.2f}",
              flush=True)
    print(table(rows))
    out = Path(args.out) if args.out else RESULTS / f"bench{'-quick' if args.quick else ''}.json"
    atomic_write_json(out, {"load_average": os.getloadavg(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
