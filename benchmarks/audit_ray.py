"""The same audit locally and on Ray: identical stored cells, and the wall time with 1 and 2 workers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/audit_ray.py [--iterations 1000] [--out /tmp/audit-ray]

A trimmed ``examples/audit.yaml`` (4 built-in photos at 32 px; Inverting Gradients on LeNet and
the exact fc-bias inversion on the MLP; 6 defenses; no utility training: 12 cells in 12 Ray
tasks) is run three times with the command a user types, each in a fresh folder:

- ``gradleak audit CONFIG --threads 1`` (the baseline: one process, one torch thread);
- ``gradleak audit CONFIG --ray --workers 1`` (a local Ray started for the audit, one task at a time);
- ``gradleak audit CONFIG --ray --workers 2`` (two tasks at a time).

Every stored ``cells/*/cell.json`` (key, status, every PSNR / SSIM / label figure and summary;
timing left out) of the Ray runs must equal the local run's exactly; the script prints the
cells compared, the first difference if any, each run's wall time (Ray start-up and shut-down
included) and the speed-ups against the local run. The load average before and after is
printed too: on a shared machine, other processes take CPUs from the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
name: audit on Ray (benchmark)
data: {{name: photos, n: 4, size: 32}}
models: [lenet, mlp]
attacks:
  - {{name: inverting-gradients, options: {{iterations: {iterations}}}, models: [lenet]}}
  - {{name: fc-bias, models: [mlp]}}
defenses: [none, "gaussian:variance=1e-4", "pruning:ratio=0.2", "sign", "dp-sgd:epsilon=8",
           "secure-aggregation:clients=4"]
batch_sizes: [1]
utility: false
"""

RUNS = (("local, --threads 1", ["--threads", "1"]), ("--ray --workers 1", ["--ray", "--workers", "1"]),
        ("--ray --workers 2", ["--ray", "--workers", "2"]))


def stored_cells(out: Path) -> dict[str, dict]:
    """Every stored cell of an audit folder, its timing left out."""
    cells = {}
    for path in sorted(out.glob("cells/*/cell.json")):
        record = json.loads(path.read_text())
        record.get("result", {}).pop("seconds", None)
        cells[path.parent.name] = record
    return cells


def first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: only in one run"
            found = first_difference(a[key], b[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} != {len(b)} entries"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="Inverting Gradients iterations per cell")
    parser.add_argument("--out", default=None, help="folder for the three audits (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="audit-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "audit.yaml"
    config.write_text(CONFIG.format(iterations=args.iterations))
    command = [str(Path(sys.executable).with_name("gradleak")), "audit", str(config), "-q", "--fresh"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    print(f"config: {config} (Inverting Gradients {args.iterations} iterations); load average before: {load()}")
    walls, cells = {}, {}
    for label, options in RUNS:
        out = root / label.replace(" ", "").replace(",", "_").replace("-", "")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        done = subprocess.run([*command, "--out", str(out), *options], env=env, capture_output=True, text=True,
                              timeout=3600)
        walls[label] = time.perf_counter() - start
        if done.returncode != 0:
            print(f"{label}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            return 1
        cells[label] = stored_cells(out)
        print(f"{label:>20}: {len(cells[label])} cells stored, wall {walls[label]:.1f} s (load average now {load()})")
    reference = cells[RUNS[0][0]]
    same = True
    for label, _ in RUNS[1:]:
        diff = first_difference(reference, cells[label])
        same &= diff is None
        numbers = sum(len(c["result"].get("psnr") or []) for c in cells[label].values())
        print(f"{label} vs local: {'identical' if diff is None else 'DIFFERENT: ' + diff} "
              f"({len(cells[label])} cells, {numbers} per-image PSNRs)")
    local = walls[RUNS[0][0]]
    print("speed-up vs local: " + ", ".join(f"{label} {local / walls[label]:.2f}x" for label, _ in RUNS[1:])
          + f"; --workers 2 vs --workers 1: {walls[RUNS[1][0]] / walls[RUNS[2][0]]:.2f}x")
    print(f"load average after: {load()} (2 cores here; other sessions' processes share them)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
