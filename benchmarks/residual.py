"""The update residual (truth-free) against PSNR (needs the truth).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/residual.py cases
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/residual.py audit [--run] [--out runs/residual-audit] [--config examples/audit.yaml]

``cases``: the residual of closed forms and of Inverting Gradients on built-in real images
(MLP, LeNet; float32 and float64), next to their PSNR: the figures behind the certifying
tolerance of ``gradleak.residual`` (1e4 machine epsilons).

``audit``: reads an audit folder (``--run`` first runs ``gradleak audit CONFIG --jobs 1
--threads 1`` into it, timed, with the load average before and after) and prints, per attack
family (the attack's module), how well the residual ranks what PSNR ranks: Spearman's rho
between each cell's median residual and its mean PSNR, and between each update's residual
and the mean PSNR of its images (a good truth-free measure gives a strongly negative rho:
lower residual, higher PSNR). Then every certified-exact update's lowest image PSNR: the
claim checked is that none is below 60 dB. The held-out figure: the audit's own images,
never used to choose the tolerance (which comes from ``cases``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------- cases
CASES = [  # (model, options, data, size, images, attack, attack options)
    ("mlp", {}, "photos", 32, 1, "fc-bias", {}),
    ("mlp", {"hidden": [256]}, "digits", 16, 4, "qian", {}),
    ("mlp", {"hidden": [64]}, "digits", 16, 8, "qian", {}),
    ("mlp", {"hidden": [64]}, "photos", 32, 4, "qian", {}),
    ("mlp", {"hidden": [256]}, "photos", 32, 8, "qian", {}),
    ("lenet", {}, "digits", 16, 1, "rgap", {}),
    ("lenet", {}, "photos", 32, 1, "rgap", {}),
    ("lenet", {}, "photos", 32, 1, "inverting-gradients", {"iterations": 300}),
    ("lenet", {}, "photos", 32, 1, "inverting-gradients", {"iterations": 2000}),
    ("mlp", {}, "photos", 32, 1, "inverting-gradients", {"iterations": 2000}),
]


def run_cases() -> None:
    import gradleak as gl
    from gradleak.data import load_builtin
    from gradleak.metrics import score
    from gradleak.models import ModelSpec
    from gradleak.pipeline import attack_with_residuals, make_attack

    print(f"load average before: {_load()}")
    print(f"{'model':22s} {'data':12s} {'attack':22s} {'dtype':8s} {'residual':>9s} certified {'PSNR dB':>8s} {'s':>6s}")
    for model, options, data, size, n, attack, attack_options in CASES:
        for dtype in ("float32", "float64") if not attack.startswith("inverting") else ("float32",):
            dataset = load_builtin(data, size=size, n=n)
            built = ModelSpec(model, options, device="cpu", dtype=dtype).build(tuple(dataset.images.shape[1:]),
                                                                               len(dataset.classes))
            images = dataset.images.to(built.dtype)
            update = gl.fedsgd_update(built.module, images, dataset.labels, loss=built.loss,
                                      spec=gl.DataSpec.from_images(images))
            start = time.perf_counter()
            rec, (residual,) = attack_with_residuals(make_attack(attack, built.module, gl.ThreatModel(), attack_options),
                                                     [update], quiet=True)
            seconds = time.perf_counter() - start
            psnr = score(rec.images, images, use_lpips=False).summary["psnr_mean"] if rec.images is not None else None
            label = f"{model}{json.dumps(options) if options else ''}"
            print(f"{label:22s} {data}x{n:<6d} {attack + json.dumps(attack_options) * bool(attack_options):22s} "
                  f"{dtype:8s} {residual.value:9.2g} {'yes' if residual.certified else 'no ':9s} "
                  f"{psnr if psnr is not None else float('nan'):8.1f} {seconds:6.1f}")
    print(f"load average after: {_load()}")


# ----------------------------------------------------------------------------- audit
def _spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def _family(attack: str) -> str:
    from gradleak.attacks import get_attack

    return get_attack(attack).__module__.rsplit(".", 1)[-1]


def _numbers(value):
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def read_cells(out: Path) -> list[dict]:
    cells = []
    for path in sorted(out.glob("cells/*/cell.json")):
        result = json.loads(path.read_text())["result"]
        if result["status"] == "done":
            cells.append({k: _numbers(v) for k, v in result.items()})
    return cells


def audit_figures(out: Path) -> dict:
    """Per family: cells, Spearman rho per cell and per update, certified updates and their lowest PSNR."""
    families: dict[str, dict] = {}
    for cell in read_cells(out):
        if not cell.get("residual"):
            raise SystemExit(f"{out}: cell {cell['cell_id']} has no residual (stored before residuals were recorded)")
        family = families.setdefault(_family(cell["attack"]), {"cells": [], "updates": [], "certified": []})
        psnrs = [p if p is not None else float("nan") for p in cell["psnr"]]
        family["cells"].append((cell["summary"].get("residual_median"), cell["summary"].get("psnr_mean"),
                                cell["defense"], cell["attack"]))
        start = 0
        for value, certified, count in zip(cell["residual"], cell["certified"], cell["update_images"]):
            mine = psnrs[start:start + count]
            start += count
            finite = [p for p in mine if not math.isnan(p)]
            mean = sum(min(p, 300.0) for p in finite) / len(finite) if finite else None
            family["updates"].append((value, mean))
            if certified:
                family["certified"].append((min(mine) if mine else float("nan"), value, cell["defense"]))
    figures = {}
    for name, family in sorted(families.items()):
        cells, updates, certified = family["cells"], family["updates"], family["certified"]
        figures[name] = {
            "attacks": sorted({c[3] for c in cells}), "cells": len(cells), "updates": len(updates),
            "rho_cells": _spearman([c[0] for c in cells], [c[1] for c in cells]),
            "rho_updates": _spearman([u[0] for u in updates], [u[1] for u in updates]),
            "certified_updates": len(certified),
            "certified_min_psnr": min((c[0] for c in certified), default=None),
            "certified_defenses": sorted({c[2] for c in certified}),
            "cells_table": sorted(cells, key=lambda c: (c[0] is None, c[0] or 0.0)),
        }
    return figures


def run_audit(config: str, out: Path) -> None:
    before = _load()
    start = time.perf_counter()
    arguments = ["audit", config, "--out", str(out), "--jobs", "1", "--threads", "1", "-q"]
    subprocess.run([sys.executable, "-c", "from gradleak.cli import app; app()", *arguments], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"gradleak {' '.join(arguments)}: {time.perf_counter() - start:.0f} s "
          f"(load average before {before}, after {_load()})")


def print_audit(out: Path) -> None:
    figures = audit_figures(out)
    print(f"{'family':14s} {'attacks':24s} {'cells':>5s} {'rho cells':>9s} {'updates':>7s} {'rho upd.':>8s} "
          f"{'certified':>9s} {'lowest certified PSNR':>22s}")
    for name, f in figures.items():
        rho_c = "n/a" if f["rho_cells"] is None else f"{f['rho_cells']:+.2f}"
        rho_u = "n/a" if f["rho_updates"] is None else f"{f['rho_updates']:+.2f}"
        low = "none certified" if f["certified_min_psnr"] is None else f"{f['certified_min_psnr']:.1f} dB"
        print(f"{name:14s} {', '.join(f['attacks']):24s} {f['cells']:5d} {rho_c:>9s} {f['updates']:7d} {rho_u:>8s} "
              f"{f['certified_updates']:9d} {low:>22s}")
    for name, f in figures.items():
        print(f"\n{name}: cells by median residual (residual, mean PSNR dB, defense)")
        for residual, psnr, defense, _ in f["cells_table"]:
            print(f"  {residual if residual is not None else float('nan'):10.3g}  "
                  f"{psnr if psnr is not None else float('nan'):7.1f}  {defense}")
        if f["certified_defenses"]:
            print(f"  certified exact under: {', '.join(f['certified_defenses'])}")
    low = [f["certified_min_psnr"] for f in figures.values() if f["certified_min_psnr"] is not None]
    print(f"\nno certified-exact reconstruction below 60 dB: {'yes' if all(v >= 60 for v in low) else 'NO'}"
          + (f" (lowest {min(low):.1f} dB)" if low else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("cases")
    audit = sub.add_parser("audit")
    audit.add_argument("--out", default="runs/residual-audit")
    audit.add_argument("--config", default="examples/audit.yaml")
    audit.add_argument("--run", action="store_true", help="run the audit first (about 4 minutes on 2 idle cores)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "cases":
        run_cases()
        return
    if args.run:
        run_audit(args.config, Path(args.out))
    print_audit(Path(args.out))


if __name__ == "__main__":
    main()
