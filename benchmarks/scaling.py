"""Scaling curves of the gradient-matching step and of the closed forms (issue 14).

    .venv/bin/python benchmarks/scaling.py [--quick] [--axis batch side ...] [--device cpu] [--threads 1]

Seconds per iteration and memory of Inverting Gradients (Geiping et al. 2020, arXiv
2003.14053: cosine matching + TV, Adam on the signed gradient) through the public API
(``gradleak.get_attack("inverting-gradients")(model, ThreatModel(), iterations=N, ...)
.reconstruct(update)``), one axis at a time, the others held at batch 1, 32 px:

- ``batch``: 1-64 images on ConvNet-64 (eval-mode BatchNorm);
- ``side``: 32-224 px on ConvNet-64 and on the CIFAR ResNet-18 (both take any side);
- ``model``: LeNet, MLP (256-128), ConvNet-64, CIFAR ResNet-18;
- ``restarts``: 1-16 restarts on DLG's LeNet, batched with ``torch.func.vmap`` (the
  engine's ``batched_restarts="auto"`` choice for this model);
- ``closed-form``: seconds per attack of ``fc-bias`` (MLP 256, batch 1) and ``qian``
  (MLP 256, batch 4) against the input side 16-224.

Seconds per iteration: the median over the iterations after two of warm-up, read off the
attack's ``progress`` hook with ``bench.Clock`` (as ``bench.py`` does); one iteration
advances every restart. Memory (CPU): every point runs in its own spawned process; the
kernel's peak-RSS mark (VmHWM) is reset just before ``reconstruct`` (``/proc/self/clear_refs``),
so the growth is the attack's own, not the model build's or the update's. CUDA:
``torch.cuda.max_memory_allocated`` during the attack minus the memory held before it.

Images: built-in photos 0-7 (8 and 9 stay held out). A batch of more than 8 takes tiles:
each photo is resized to k x side and cut into k x k tiles of side x side (tile t of every
photo before tile t + 1), so 64 images are 64 different crops, labelled by their photo.
Untrained seeded models, labels inferred. The timings are figures to print, never asserted.
Writes ``benchmarks/results/scaling[-quick].json`` and the figure ``docs/figures/scaling.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import RESULTS, Clock, _fmt, _peak_rss_mb, _rss_mb  # noqa: E402  (benchmarks/ is not a package)

FIGURE = Path(__file__).parents[1] / "docs" / "figures" / "scaling.png"
WARMUP = 2
PHOTOS = 8  # photos 0-7; 8 and 9 are held out


@dataclass(frozen=True)
class Point:
    axis: str
    x: int | str                    # the value on the axis
    series: str                     # the curve the point belongs to
    attack: str
    model: str
    model_options: dict = field(default_factory=dict)
    batch: int = 1
    side: int = 32
    restarts: int = 1
    iterations: int | None = 8      # None: closed form

    @property
    def name(self) -> str:
        return f"{self.axis}:{self.series}:{self.x}"


IG = "inverting-gradients"
CONVNET64 = ("convnet", {"width": 64})
MODEL_AXIS = {"LeNet": ("lenet", {}), "MLP": ("mlp", {"hidden": "256,128"}), "ConvNet-64": CONVNET64,
              "ResNet-18": ("resnet18", {})}


def points(quick: bool) -> list[Point]:
    """The sweep; ``quick`` keeps the cheap end of every axis (a minute or two on one core)."""
    batches, sides = ((1, 4, 16), (32, 64)) if quick else ((1, 2, 4, 8, 16, 32, 64), (32, 64, 128, 224))
    restarts, closed = ((1, 4, 16), (16, 64)) if quick else ((1, 2, 4, 8, 16), (16, 32, 64, 128, 224))
    heavy = 6  # iterations where one costs seconds: 3 timed after the warm-up
    out = [Point("batch", b, "ConvNet-64", IG, *CONVNET64, batch=b, iterations=heavy if b >= 32 else 8)
           for b in batches]
    for series, (model, options) in (("ConvNet-64", CONVNET64), ("ResNet-18", MODEL_AXIS["ResNet-18"])):
        out += [Point("side", s, series, IG, model, options, side=s, iterations=heavy if s >= 128 else 8)
                for s in sides if not (quick and series == "ResNet-18")]
    out += [Point("model", label, label, IG, *MODEL_AXIS[label]) for label in MODEL_AXIS
            if not (quick and label == "ResNet-18")]
    out += [Point("restarts", r, "LeNet", IG, "lenet", restarts=r, iterations=40) for r in restarts]  # ms each
    for attack, batch in (("fc-bias", 1), ("qian", 4)):
        out += [Point("closed-form", s, attack, attack, "mlp", {"hidden": "256"}, batch=batch, side=s,
                      iterations=None) for s in closed]
    return out


def tiles(batch: int, side: int):
    """``batch`` distinct side x side images from photos 0-7 and their labels (photo index):
    the whole photos up to 8, then k x k tiles of each photo resized to k * side."""
    from gradleak.data import load_builtin

    k = math.ceil(math.sqrt(math.ceil(batch / PHOTOS)))
    photos = load_builtin("photos", size=k * side, n=PHOTOS)
    cut = photos.images.unfold(2, side, side).unfold(3, side, side)     # N, C, k, k, side, side
    images = cut.permute(2, 3, 0, 1, 4, 5).reshape(-1, photos.images.shape[1], side, side)
    return images[:batch].contiguous(), photos.labels.repeat(k * k)[:batch]


def per_iteration(stamps: list[float], warmup: int = WARMUP) -> float | None:
    """Median seconds between the progress stamps after ``warmup`` iterations (None: too few)."""
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return statistics.median(steps) if steps else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_point(point: Point, device: str, threads: int) -> dict:
    """Measure one point in this process; returns its figures (JSON-able)."""
    import torch

    torch.set_num_threads(threads)
    import gradleak as gl
    from gradleak.metrics import match, psnr

    images, labels = tiles(point.batch, point.side)
    built = gl.ModelSpec(point.model, point.model_options, device=device, mode="eval").build(
        (3, point.side, point.side), 10)
    images, labels = images.to(built.device), labels.to(built.device)
    update = gl.fedsgd_update(built.module, images, labels, loss=built.loss)
    options = {} if point.iterations is None else {"iterations": point.iterations, "restarts": point.restarts}
    attack = gl.get_attack(point.attack)(built.module, gl.ThreatModel(), **options)
    cuda = built.device.type == "cuda"
    clock = Clock(images)

    def progress(done: int, total: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        clock.progress(done, total)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, reset = _rss_mb(), _reset_peak_rss()
    start = time.perf_counter()
    result = attack.reconstruct(update, progress=progress)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        growth, peak = (torch.cuda.max_memory_allocated() - before) / 2**20, torch.cuda.max_memory_allocated() / 2**20
    else:
        growth, peak = (_hwm_mb() if reset else _peak_rss_mb()) - before, _peak_rss_mb()
    score = None
    if point.iterations is None and result.images is not None:  # closed forms: check they stayed exact
        score = float(psnr(result.images[match(result.images, images)], images).clamp(max=100).mean())
    return {**asdict(point), "name": point.name, "device": str(built.device), "threads": threads,
            "parameters": sum(p.numel() for p in built.module.parameters()),
            "iterations_run": len(clock.steps) or None, "seconds_per_iteration": per_iteration(clock.steps),
            "seconds": seconds, "memory_growth_mb": max(0.0, growth), "peak_memory_mb": peak,
            "psnr": score, "load_average": os.getloadavg()[0]}


def _isolated(point: Point, device: str, threads: int) -> dict:
    """The point in a fresh process, so that its memory is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_point, point, device, threads).result()


def table(rows: list[dict]) -> str:
    """One markdown table per axis: the point, its cost, the ratio to the first point of its
    series (model axis: to LeNet), measured in the same run, memory growth and the load average."""
    out = []
    for axis in dict.fromkeys(r["axis"] for r in rows):
        mine = [r for r in rows if r["axis"] == axis]
        closed = mine[0]["iterations"] is None
        cost = "seconds per attack" if closed else "s/iteration"
        head = (f"| {axis} | series | parameters | {cost} | x first | memory growth MB | peak MB "
                f"| {'PSNR dB | ' if closed else ''}load |")
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        first: dict[str, float] = {}
        for r in mine:
            value = r["seconds"] if closed else r["seconds_per_iteration"]
            base = first.setdefault("" if axis == "model" else r["series"], value)
            ratio = "-" if value is None or not base else f"{value / base:.2f}"
            out.append(f"| {r['x']} | {r['series']} | {r['parameters']:,d} | {_fmt(value, '.4f')} | {ratio} "
                       f"| {r['memory_growth_mb']:.0f} | {r['peak_memory_mb']:.0f} "
                       f"| {(_fmt(r['psnr'], '.2f') + ' | ') if closed else ''}{r['load_average']:.2f} |")
        out.append("")
    return "\n".join(out)


_PANELS = {  # axis: (x label, x from a row, slope of the reference line on the time panel)
    "batch": ("batch size (ConvNet-64, 32 px)", lambda r: r["batch"], 1),
    "side": ("image side, px (batch 1)", lambda r: r["side"], 2),
    "model": ("parameters (batch 1, 32 px)", lambda r: r["parameters"], None),
    "restarts": ("restarts (LeNet, vmap, 32 px)", lambda r: r["restarts"], 1),
    "closed-form": ("image side, px (MLP 256)", lambda r: r["side"], 2),
}


def figure(rows: list[dict], path: Path) -> Path:
    """One column per axis: seconds (per iteration; per attack for the closed forms) on top,
    memory growth below, log-log, with a dashed line of slope 1 (time linear in the batch or
    the restarts) or 2 (linear in the pixels) through each series' first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from gradleak._io import save_figure

    axes_present = [a for a in _PANELS if any(r["axis"] == a for r in rows)]
    fig, grid = plt.subplots(2, len(axes_present), figsize=(3.3 * len(axes_present), 5.6), squeeze=False)
    for column, axis in enumerate(axes_present):
        label, x_of, slope = _PANELS[axis]
        mine = [r for r in rows if r["axis"] == axis]
        for series in dict.fromkeys(r["series"] for r in mine):
            pts = [r for r in mine if r["series"] == series]
            xs = [x_of(r) for r in pts]
            cost = [r["seconds"] if r["iterations"] is None else r["seconds_per_iteration"] for r in pts]
            style = "o" if axis == "model" else "o-"
            line, = grid[0][column].plot(xs, cost, style, label=series)
            grid[1][column].plot(xs, [r["memory_growth_mb"] for r in pts], style, color=line.get_color(), label=series)
            if slope and len(xs) > 1 and cost[0]:
                grid[0][column].plot(xs, [cost[0] * (x / xs[0]) ** slope for x in xs], "--", lw=0.8,
                                     color=line.get_color(), alpha=0.6)
            if axis == "model":
                for x, y, name in zip(xs, cost, [series] * len(xs)):
                    grid[0][column].annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        values = sorted({x_of(r) for r in mine})
        for row in (0, 1):
            ax = grid[row][column]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", lw=0.3)
            ax.yaxis.set_major_locator(LogLocator(10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            if axis != "model":
                ax.set_xticks(values, [str(v) for v in values], fontsize=7)
        grid[1][column].set_xlabel(label, fontsize=8)
        grid[0][column].set_title(axis, fontsize=9)
        if axis != "model":
            grid[0][column].legend(fontsize=7)
    grid[0][0].set_ylabel("s / iteration (closed forms: s / attack)", fontsize=8)
    grid[1][0].set_ylabel("memory growth during the attack, MB", fontsize=8)
    device = rows[0]["device"] if rows else "?"
    fig.suptitle(f"Inverting Gradients step and closed forms, {device}, {rows[0]['threads'] if rows else '?'} thread"
                 " (dashed: linear in batch/restarts/pixels)", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the cheap end of every axis (1-2 minutes)")
    parser.add_argument("--axis", nargs="+", choices=list(_PANELS), help="run only these axes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each point")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/scaling[-quick].json)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other axes' rows of the JSON file (rerun one axis, redraw the figure)")
    parser.add_argument("--figure", help=f"PNG file (default {FIGURE.relative_to(FIGURE.parents[2])}; "
                                         "--quick: none unless given)")
    args = parser.parse_args()
    from gradleak._io import atomic_write_json

    rows, began = [], time.perf_counter()
    for point in [p for p in points(args.quick) if not args.axis or p.axis in args.axis]:
        rows.append(_isolated(point, args.device, args.threads))
        r = rows[-1]
        print(f"{point.name}: s/it {_fmt(r['seconds_per_iteration'], '.4f')}, {r['seconds']:.1f} s, "
              f"+{r['memory_growth_mb']:.0f} MB, load {r['load_average']:.2f}", flush=True)
    print(f"\n{len(rows)} points in {time.perf_counter() - began:.0f} s; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    out = Path(args.out) if args.out else RESULTS / f"scaling{'-quick' if args.quick else ''}.json"
    if args.update and out.exists():
        import json

        ran = {r["axis"] for r in rows}
        kept = [r for r in json.loads(out.read_text())["rows"] if r["axis"] not in ran]
        rows = sorted(kept + rows, key=lambda r: list(_PANELS).index(r["axis"]))  # stable: order within an axis kept
    print(table(rows))
    atomic_write_json(out, {"load_average": os.getloadavg(), "rows": rows})  # each row has its own load too
    print(f"wrote {out}")
    if args.figure or not args.quick:
        print(f"wrote {figure(rows, Path(args.figure) if args.figure else FIGURE)}")


if __name__ == "__main__":
    main()
