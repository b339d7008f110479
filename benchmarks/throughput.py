"""Images reconstructed per minute: one update at a time (the baseline) against batched targets
and worker processes, with the PSNR of every image compared.

    .venv/bin/python benchmarks/throughput.py targets --baseline-src /tmp/base/src [--n 32] [--iterations 2000]
    .venv/bin/python benchmarks/throughput.py audit --baseline-src /tmp/base/src [--config examples/audit.yaml]
    .venv/bin/python benchmarks/throughput.py equivalence [--n 32] [--iterations 300]

``targets``: Inverting Gradients on DLG's LeNet (zoo ``lenet``, seed 0), one FedSGD update per
image, ``--n`` real 32-px colour images (quadrants of the built-in photos at 64 px), each
attacked as its own target, each row in its own process (warm-up first):

- ``before, one at a time``: gradleak from ``--baseline-src`` (a checkout from before batched
  targets, e.g. ``git worktree add /tmp/base 29c95c8``), one ``reconstruct`` per update, one
  torch thread;
- ``before, 2 threads`` (``--spread``; torch's default on this 2-core machine): two threads
  change only the order of float sums, so its PSNRs against the first row show how far float
  rounding alone moves an Inverting Gradients run (sign-Adam amplifies last-bit differences);
- ``now, one at a time``: this checkout with ``batched_targets="loop"``;
- ``now, batched``: ``attack.reconstruct_many`` (chunks of ``MAX_SLOTS`` samples in one vmap);
- ``now, batched, 2 threads``: the same with two torch threads (the batched kernels are large
  enough for intra-op threads to pay, unlike one LeNet image's).

``audit``: the same audit config run with the command a user types, each in a fresh folder:
``gradleak audit CONFIG`` from ``--baseline-src`` (a checkout of gradleak before batched targets
and worker processes, e.g. ``git worktree add /tmp/base 29c95c8``) with its default threads
(or ``--threads N`` with ``--before-threads N``),
then from this checkout with its defaults (``--jobs auto``, batched targets). Images per minute
= images attacked by all cells / wall minutes (utility trainings and report included); the
per-image PSNRs of the two are compared cell by cell.

``equivalence``: this checkout in one process and one thread, one at a time
(``batched_targets="loop"``) against batched, in float32 and again in float64 (model, images and
update in double): the largest pixel and PSNR differences. In float64 rounding is 2^29 times
finer, so sign-Adam has almost no last-bit differences to amplify: what is left is what batching
changes in the computation itself.

``--config benchmarks/audit-float64.yaml`` (the example audit in float64, 300 iterations, no
utility): with rounding too fine for sign-Adam to amplify, every image's PSNR before and now
should agree to float tolerance.

Prints a table per part (with the load average) and writes benchmarks/results/throughput-<part>.json
(``throughput-audit-<config name>.json`` for another config).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gradinversion import photo_tiles  # noqa: E402

import gradleak as gl  # noqa: E402
from gradleak._io import atomic_write_json  # noqa: E402
from gradleak.metrics import psnr  # noqa: E402
from gradleak.models import build_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _attack(indices: list[int], iterations: int, mode: str | None, threads: int,
            dtype: torch.dtype = torch.float32) -> tuple[list[float], list[torch.Tensor]]:
    """PSNR of each image's reconstruction and the reconstructions, in this process. ``mode``
    None: the gradleak on the path has no batched targets (a checkout from before them): one
    ``reconstruct`` per update."""
    torch.set_num_threads(threads)
    images, labels = photo_tiles()
    images = images.to(dtype)
    model = build_model("lenet", (3, 32, 32), 10, seed=0, dtype=dtype)
    spec = gl.DataSpec.from_images(images)
    updates = [gl.fedsgd_update(model, images[k:k + 1], labels[k:k + 1], spec=spec) for k in indices]
    options = {} if mode is None else {"batched_targets": mode}
    attack = gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), iterations=iterations, **options)
    results = [attack.reconstruct(u) for u in updates] if mode is None else list(attack.reconstruct_many(updates))
    values = [float(psnr(r.images.clamp(0, 1), images[k:k + 1]).mean()) for r, k in zip(results, indices)]
    return values, [r.images for r in results]


def _row(src: str, n: int, iterations: int, mode: str | None, threads: int) -> tuple[float, list[float]]:
    """One row in its own process with ``src`` first on the path: (seconds of the attacks, PSNRs)."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "row", "--n", str(n), "--iterations", str(iterations),
                          "--mode", mode or "none", "--threads", str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    return record["seconds"], record["psnr"]


def row(args) -> None:
    mode = None if args.mode == "none" else args.mode
    _attack([0, 1], 5, mode, args.threads)  # warm-up: first kernels
    start = time.perf_counter()
    values, _ = _attack(list(range(args.n)), args.iterations, mode, args.threads)
    print(json.dumps({"seconds": time.perf_counter() - start, "psnr": values}))


def targets(args) -> dict:
    here = str(Path(__file__).parents[1] / "src")
    runs = [("before, one at a time", args.baseline_src, None, 1),
            ("before, 2 threads", args.baseline_src, None, 2),
            ("now, one at a time", here, "loop", 1),
            ("now, batched", here, "auto", 1),
            ("now, batched, 2 threads", here, "auto", 2)]
    rows = {}
    for name, src, mode, threads in runs:
        if name == "before, 2 threads" and not args.spread:
            continue
        load = os.getloadavg()[0]
        seconds, values = _row(src, args.n, args.iterations, mode, threads)
        rows[name] = {"seconds": seconds, "psnr": values, "load": load}
        print(f"  {name}: {seconds:.1f} s (load {load:.2f})", flush=True)
        atomic_write_json(RESULTS / "throughput-targets-partial.json", rows)  # kept if stopped
    return _table("targets", rows, args.n, runs[0][0], f"{args.n} LeNet targets, IG {args.iterations} it")


def equivalence(args) -> dict:
    """This checkout, one thread, one process: one at a time (``batched_targets="loop"``) against
    batched, in float32 and in float64, every image compared pixel by pixel and by PSNR."""
    result = {"part": "equivalence", "images": args.n, "iterations": args.iterations, "rows": {}}
    print(f"{args.n} LeNet targets, IG {args.iterations} it, one thread: batched against one at a time")
    print(f"{'dtype':8s} {'loop s':>7s} {'batched s':>9s} {'speed-up':>8s} {'max |dpixel|':>12s} "
          f"{'max |dPSNR| dB':>14s} {'median |dPSNR| dB':>17s}")
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        runs = {}
        for mode in ("loop", "auto"):
            _attack([0, 1], 5, mode, 1, dtype)  # warm-up
            start = time.perf_counter()
            values, recon = _attack(list(range(args.n)), args.iterations, mode, 1, dtype)
            runs[mode] = (time.perf_counter() - start, values, recon)
        (t_loop, p_loop, x_loop), (t_batch, p_batch, x_batch) = runs["loop"], runs["auto"]
        diffs = [abs(a - b) for a, b in zip(p_loop, p_batch)]
        pixel = max(float((a - b).abs().max()) for a, b in zip(x_loop, x_batch))
        row = {"loop_seconds": t_loop, "batched_seconds": t_batch, "speedup": t_loop / t_batch,
               "max_abs_pixel_difference": pixel, "max_abs_psnr_difference": max(diffs),
               "median_abs_psnr_difference": statistics.median(diffs), "psnr_loop": p_loop,
               "psnr_batched": p_batch, "load": os.getloadavg()[0]}
        result["rows"][name] = row
        print(f"{name:8s} {t_loop:7.1f} {t_batch:9.1f} {row['speedup']:7.2f}x {pixel:12.2e} {max(diffs):14.2e} "
              f"{row['median_abs_psnr_difference']:17.2e}", flush=True)
        atomic_write_json(RESULTS / "throughput-equivalence.json", result)
    return result


def _table(part: str, rows: dict, images: int, baseline: str, title: str) -> dict:
    base = rows[baseline]
    print(f"\n{title}")
    print(f"{'run':28s} {'seconds':>8s} {'images/min':>10s} {'x baseline':>10s} {'mean PSNR':>9s} "
          f"{'max |dPSNR|':>11s} {'median |dPSNR|':>14s}")
    for name, row in rows.items():
        diffs = [abs(a - b) for a, b in zip(row["psnr"], base["psnr"])]
        row.update(images_per_minute=60 * images / row["seconds"], speedup=base["seconds"] / row["seconds"],
                   max_abs_psnr_difference=max(diffs), median_abs_psnr_difference=statistics.median(diffs))
        print(f"{name:28s} {row['seconds']:8.1f} {row['images_per_minute']:10.2f} {row['speedup']:9.2f}x "
              f"{statistics.fmean(row['psnr']):9.2f} {max(diffs):11.3f} {statistics.median(diffs):14.3f}")
    result = {"part": part, "title": title, "images": images, "rows": rows}
    atomic_write_json(RESULTS / f"throughput-{part}.json", result)
    return result


def _audit_psnrs(out: Path) -> tuple[list[float], int]:
    """Every image's PSNR over the stored cells (sorted by cell id), and how many images were attacked."""
    values = []
    for path in sorted(out.glob("cells/*/cell.json")):
        result = json.loads(path.read_text())["result"]
        values += [v if isinstance(v, (int, float)) else float("nan") for v in result.get("psnr", [])]
    return values, len(values)


def audit(args) -> dict:
    rows, work = {}, Path(tempfile.mkdtemp(prefix="throughput-audit-"))
    threads = "default threads" if args.before_threads is None else f"--threads {args.before_threads}"
    before = [] if args.before_threads is None else ["--threads", str(args.before_threads)]
    runs = [(f"before (one process, {threads})", args.baseline_src, before),
            ("now (--jobs auto, batched targets)", str(Path(__file__).parents[1] / "src"), [])]
    images = 0
    try:
        for name, src, extra in runs:
            out = work / name.split()[0]
            env = {**os.environ, "PYTHONPATH": src}
            env.pop("OMP_NUM_THREADS", None)  # each run with its own defaults
            load = os.getloadavg()[0]
            start = time.perf_counter()
            command = [sys.executable, "-c", "from gradleak.cli import app; app()", "audit", args.config, "--out",
                       str(out), "-q", *extra]
            subprocess.run(command, check=True, env=env)
            seconds = time.perf_counter() - start
            values, images = _audit_psnrs(out)
            rows[name] = {"seconds": seconds, "psnr": values, "load": load}
            print(f"  {name}: {seconds:.1f} s, {images} images (load {load:.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    part = "audit" if Path(args.config).name == "audit.yaml" else f"audit-{Path(args.config).stem}"
    part += "" if args.before_threads is None else f"-before-threads{args.before_threads}"
    return _table(part, rows, images, runs[0][0], f"gradleak audit {args.config}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part", required=True)
    t = parts.add_parser("targets")
    t.add_argument("--n", type=int, default=32)
    t.add_argument("--iterations", type=int, default=2000)
    t.add_argument("--baseline-src", required=True, help="src/ of a gradleak checkout to compare against")
    t.add_argument("--spread", action="store_true", help="add the 2-thread run (float rounding alone; needs 2 "
                   "free cores: on a loaded machine two threads wait on each other)")
    a = parts.add_parser("audit")
    a.add_argument("--config", default="examples/audit.yaml")
    a.add_argument("--before-threads", type=int, help="run the baseline with --threads N (default: torch's choice; "
                   "on a 2-core machine whose cores gain nothing from intra-op threads, --before-threads 1 is the "
                   "baseline's best)")
    a.add_argument("--baseline-src", required=True, help="src/ of a gradleak checkout to compare against")
    e = parts.add_parser("equivalence", help="batched against one at a time in float32 and float64 (this checkout)")
    e.add_argument("--n", type=int, default=32)
    e.add_argument("--iterations", type=int, default=300)
    r = parts.add_parser("row", help="internal: one row of `targets` in this process")
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--iterations", type=int, required=True)
    r.add_argument("--mode", required=True)
    r.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    {"targets": targets, "audit": audit, "equivalence": equivalence, "row": row}[args.part](args)


if __name__ == "__main__":
    main()
