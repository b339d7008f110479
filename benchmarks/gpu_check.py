"""The GPU check: every figure this project could only measure on a GPU, in one run of under 10 minutes.

    python benchmarks/gpu_check.py --device cuda                  # one GPU, ~8 minutes, one JSON
    python benchmarks/gpu_check.py --device cpu --quick           # the dry run (tests/test_gpu_check.py)

Checks, in order. Each attack has a share of the 10 minutes: 10 timed iterations measure its
speed and its iteration budget is cut to what fits (the JSON records the budget asked for,
``fitted_from``, and the one run), with ``time_budget`` as a backstop, so the run always ends and
always writes its JSON; a check that fails records its error and the others still run. Shares:
seed003 180 s, resnet18-224 60 s, gradinversion 60 s (both attacks), each bench case at most
25 s; with the agreement check, training and CUDA start-up, about 8-9 minutes on one GPU.

1. ``agreement``: the CPU and the device agree. The update of one photo (LeNet, ResNet-20) on
   both (largest relative difference), Inverting Gradients' PSNR on both (the check of
   ``tests/test_model_spec.py::test_cpu_and_cuda_agree``, which is also run through pytest
   when the device is CUDA).
2. ``seed003``: seed 003's command line case, ``reconstruct_image.py --model ResNet20-4
   --trained_model --cost_fn sim --restarts 32``: ResNet-20 at width 4 trained on a 10-class set
   (the built-in digits at 32 px; ``--data PATH`` for CIFAR batches), eval-mode BatchNorm, a
   held-out image, cosine matching with TV 1e-4, signed Adam lr 0.1, step decay, 4,000
   iterations, 32 restarts batched under ``vmap``, the best by matching loss; with gradleak's
   Inverting Gradients options (``--output-gradient``, default ``auto``; ``--rewind``, default on:
   back to the best iterate at each decay, which took the CPU's 1,500-iteration case from 8.3 to
   17.4 dB with ``observed``, docs/models.md).
3. ``resnet18-224``: Inverting Gradients on torchvision's ResNet-18 at 224 px (untrained: no
   weights can be downloaded), held-out photo 8, eval mode, 4,800 iterations.
4. ``gradinversion``: GradInversion (Yin et al. 2021) against a train-mode CIFAR ResNet-20,
   a batch of 8 photo tiles, 4 restarts with group consistency, 10,000 iterations (the paper
   runs 20,000), against Inverting Gradients at the same budget.
5. ``bench``: every case of ``benchmarks/bench.py`` at its full budget on the device.

Writes ``benchmarks/results/gpu-check[-quick]-<device>.json`` (``--out``) after every check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (benchmarks/bench.py)
import gradinversion as gi  # noqa: E402  (benchmarks/gradinversion.py)

import gradleak as gl  # noqa: E402
from gradleak._io import atomic_write_json  # noqa: E402
from gradleak.data import load_builtin  # noqa: E402
from gradleak.metrics import match, psnr, ssim  # noqa: E402

# full budget / --quick budget of every check; seconds: its share of the run on one GPU
BUDGETS = {
    "seed003": dict(iterations=4000, restarts=32, epochs=15, seconds=180, quick=dict(iterations=3, restarts=2, epochs=1)),
    "resnet18-224": dict(iterations=4800, seconds=60, quick=dict(iterations=2)),
    "gradinversion": dict(iterations=10_000, restarts=4, seconds=60, quick=dict(iterations=2, restarts=2)),
}


def _budget(name: str, quick: bool) -> dict:
    budget = dict(BUDGETS[name])
    return {**budget, **budget.pop("quick")} if quick else {k: v for k, v in budget.items() if k != "quick"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scores(images: torch.Tensor, truth: torch.Tensor) -> dict:
    images, truth = images.detach().cpu(), truth.detach().cpu()
    images = images[match(images, truth)]
    values = [round(float(v), 2) for v in psnr(images, truth)]
    return {"psnr": values, "psnr_mean": round(statistics.fmean(values), 2),
            "ssim_mean": round(float(ssim(images, truth).mean()), 3)}


def _iterations_run(rec) -> int:
    losses = [series for key, series in rec.history.items() if key.startswith("loss")]
    return max((series["x"][-1] + 1 for series in losses if series["x"]), default=0)


def _fitted(name: str, options: dict, model, threat, update, device, seconds: float | None) -> dict:
    """``options`` with the iterations cut to what fits in ``seconds`` (measured over 10 timed
    iterations after 3 of warm-up), so that the step schedule completes inside the share rather
    than being cut by ``time_budget``; ``fitted_from`` records the budget asked for."""
    if seconds is None:
        return options
    ticks = []
    probe = gl.get_attack(name)(model, threat, **{**options, "iterations": 13})
    _sync(device)
    probe.reconstruct(update, progress=lambda done, total: (_sync(device), ticks.append(time.perf_counter())))
    per_iteration = (ticks[-1] - ticks[2]) / 10
    fitted = max(1, min(options["iterations"], int(0.95 * seconds / per_iteration)))
    return {**options, "iterations": fitted, "time_budget": seconds, "fitted_from": options["iterations"],
            "seconds_per_iteration": per_iteration}


def _attack(name: str, options: dict, model, threat, update, device, seconds: float | None):
    """The attack at the iterations that fit its share; (reconstruction, seconds, options used)."""
    options = _fitted(name, options, model, threat, update, device, seconds)
    attack = gl.get_attack(name)(model, threat, **{k: v for k, v in options.items()
                                                   if k not in ("fitted_from", "seconds_per_iteration")})
    rec, elapsed = _timed_attack(attack, update, device)
    return rec, elapsed, options


def _timed_attack(attack, update, device) -> tuple:
    _sync(device)
    started = time.perf_counter()
    rec = attack.reconstruct(update)
    _sync(device)
    return rec, time.perf_counter() - started


# ------------------------------------------------------------------------------ checks
def check_agreement(device: torch.device, quick: bool) -> dict:
    """The same update and the same attack on the CPU and on the device."""
    photos = load_builtin("photos", size=32, n=2)
    out: dict = {"updates": {}}
    for name in ("lenet", "resnet20"):
        updates = {}
        for where in ("cpu", device):
            built = gl.ModelSpec(name, device=str(where), mode="eval").build((3, 32, 32), 10)
            x, y = photos.images[:1].to(built.device), photos.labels[:1].to(built.device)
            updates[str(where)] = gl.fedsgd_update(built.module, x, y).tensors
        cpu, dev = updates["cpu"], updates[str(device)]
        out["updates"][name] = max(float((cpu[n] - dev[n].cpu()).norm() / cpu[n].norm().clamp_min(1e-30)) for n in cpu)
    from gradleak.pipeline import DataRequest, attack_simulated

    iterations = 2 if quick else 50
    runs = {}
    for where in ("cpu", str(device)):
        with __import__("tempfile").TemporaryDirectory() as folder:
            result = attack_simulated("inverting-gradients", Path(folder) / "run", data=DataRequest("photos", 2),
                                      model=gl.ModelSpec("lenet", device=where), options={"iterations": iterations},
                                      quiet=True)
        runs[where] = result.scores.summary["psnr_mean"]
    out.update(iterations=iterations, psnr_cpu=runs["cpu"], psnr_device=runs[str(device)],
               psnr_difference=abs(runs["cpu"] - runs[str(device)]))
    out["agree"] = out["psnr_difference"] < 0.5 and max(out["updates"].values()) < 1e-3
    if device.type == "cuda":   # the suite's own agreement test, which skips without CUDA
        test = "tests/test_model_spec.py::test_cpu_and_cuda_agree"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=HERE.parent, capture_output=True,
                              text=True, timeout=300)
        out["pytest"] = {"test": test, "exit_code": done.returncode, "tail": done.stdout[-400:]}
    return out


def _digits_model(args, device, quick: bool, budget: dict):
    """ResNet-20 width 4 trained on the digits (or ``--data``), held-out split recorded."""
    from gradleak.data.request import DataRequest
    from gradleak.training import TrainPlan, train_model

    spec = gl.ModelSpec("resnet20", {"width": 1 if quick else 4}, device=str(device), mode="eval", seed=0)
    data = DataRequest(args.data, n=64 if quick else None, size=32)
    plan = TrainPlan(epochs=budget["epochs"], lr=0.05, batch_size=128, optimizer="sgd", weight_decay=5e-4, seed=0)
    started = time.perf_counter()
    result = train_model(spec, data, plan, quiet=True)
    _sync(device)
    return result, data, time.perf_counter() - started


def check_seed003(args, device: torch.device, quick: bool) -> dict:
    budget = _budget("seed003", quick)
    trained, data, train_seconds = _digits_model(args, device, quick, budget)
    index = trained.held_out_indices[2]   # the first two held-out images are for tuning
    dataset = data.load()
    x, y = dataset.images[index:index + 1].to(device), dataset.labels[index:index + 1].to(device)
    module = trained.model.eval()
    update = gl.fedsgd_update(module, x, y, spec=trained.data_spec)
    out = {"model": "resnet20 width 4" if not quick else "resnet20 width 1 (quick)", "data": str(args.data),
           "held_out_index": index, "held_out_accuracy": trained.held_out_accuracy, "train_seconds": train_seconds,
           **{k: budget[k] for k in ("iterations", "restarts", "epochs")}, "runs": {}}
    for variant in args.output_gradient:
        options = dict(iterations=budget["iterations"], restarts=budget["restarts"], tv=1e-4, batched_restarts="vmap",
                       output_gradient=variant, rewind=args.rewind)
        share = None if quick else budget["seconds"] / len(args.output_gradient)
        rec, seconds, used = _attack("inverting-gradients", options, module, gl.ThreatModel(), update, device, share)
        out["runs"][variant] = {**_scores(rec.images, x), "seconds": seconds, "iterations_run": _iterations_run(rec),
                                "options": used, "notes": rec.notes}
    return out


def check_resnet18_224(device: torch.device, quick: bool) -> dict:
    budget = _budget("resnet18-224", quick)
    photo = load_builtin("photos", size=224)
    x, y = photo.images[8:9].to(device), photo.labels[8:9].to(device)
    built = gl.ModelSpec("tv-resnet18", device=str(device), mode="eval", seed=0).build((3, 224, 224), 10)
    update = gl.fedsgd_update(built.module, x, y, spec=gl.DataSpec.from_images(photo.images))
    rec, seconds, used = _attack("inverting-gradients", {"iterations": budget["iterations"]}, built.module,
                                 gl.ThreatModel(), update, device, None if quick else budget["seconds"])
    return {"model": "tv-resnet18 (untrained)", "photo": 8, "iterations": budget["iterations"], **_scores(rec.images, x),
            "seconds": seconds, "iterations_run": _iterations_run(rec), "options": used,
            "seconds_per_iteration": seconds / max(_iterations_run(rec), 1)}


def check_gradinversion(device: torch.device, quick: bool) -> dict:
    budget = _budget("gradinversion", quick)
    images, labels = gi.photo_tiles()
    x, y = images[24:32].to(device), labels[24:32].to(device)   # the benchmark's held-out batch
    spec = gl.DataSpec.from_images(images)
    built = gl.ModelSpec("resnet20", device=str(device), mode="train", seed=0).build((3, 32, 32), 10)
    update = gl.fedsgd_update(built.module, x, y, spec=spec)
    share = None if quick else budget["seconds"] / 2
    out = {"model": "resnet20, train-mode BatchNorm", "batch": 8, **{k: budget[k] for k in ("iterations", "restarts")}}
    for name, threat, extra in (("gradinversion", gl.ThreatModel(bn_statistics=True), {"restarts": budget["restarts"]}),
                                ("inverting-gradients", gl.ThreatModel(), {})):
        rec, seconds, used = _attack(name, {"iterations": budget["iterations"], **extra}, built.module, threat, update,
                                     device, share)
        out[name] = {**_scores(rec.images, x), "seconds": seconds, "iterations_run": _iterations_run(rec),
                     "options": used}
    return out


def check_bench(device: torch.device, quick: bool) -> dict:
    """bench.py's cases, in this process (CUDA's peak memory is reset per case)."""
    rows = []
    cases = bench.CASES if not quick else [replace(c, quick=c.quick and 2) for c in bench.CASES if c.name in QUICK_CASES]
    for case in cases:
        row = bench.run_case(case, quick=quick, device=str(device), threads=torch.get_num_threads(), start=0,
                             time_budget=None if quick else BENCH_CASE_SECONDS)
        rows.append({k: v for k, v in row.items() if k != "curve"})
    return {"table": bench.table(rows), "rows": rows}


BENCH_CASE_SECONDS = 25   # the most an iterative bench case may take (most finish sooner on one GPU)
QUICK_CASES = ("dlg-lenet-b1", "ig-resnet18-b1", "fc-bias-mlp-224-b1")   # the dry run: one of each kind, 2 iterations
CHECKS = ("agreement", "seed003", "resnet18-224", "gradinversion", "bench")


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    out = Path(args.out) if args.out else HERE / "results" / f"gpu-check{'-quick' if args.quick else ''}-{device.type}.json"
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "quick": args.quick,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(), "checks": {}}
    functions = {"agreement": lambda: check_agreement(device, args.quick),
                 "seed003": lambda: check_seed003(args, device, args.quick),
                 "resnet18-224": lambda: check_resnet18_224(device, args.quick),
                 "gradinversion": lambda: check_gradinversion(device, args.quick),
                 "bench": lambda: check_bench(device, args.quick)}
    started = time.perf_counter()
    for name in args.checks:
        begun = time.perf_counter()
        try:
            result = {"status": "ok", **functions[name]()}
        except Exception as error:   # one failing check must not lose the others' figures
            result = {"status": "error", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-2000:]}
        result["check_seconds"] = time.perf_counter() - begun
        report["checks"][name] = result
        report["seconds"] = time.perf_counter() - started
        atomic_write_json(out, report)
        print(f"{name}: {result['status']} in {result['check_seconds']:.1f} s", flush=True)
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few iterations everywhere (the CPU dry run)")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--data", default="digits", help="seed003's 10-class training set (built-in or CIFAR path)")
    parser.add_argument("--rewind", action=argparse.BooleanOptionalAction, default=True,
                        help="seed003: back to the best iterate at each decay of the step schedule")
    parser.add_argument("--output-gradient", nargs="+", default=["auto"], choices=("auto", "model"),
                        help="seed003: Inverting Gradients' output_gradient option(s) to run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main()
