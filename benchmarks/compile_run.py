"""``compile=True`` in a whole reconstruction: wall time to the same image, eager against compiled.

    .venv/bin/python benchmarks/compile_run.py [--iterations 1200] [--model convnet] [--device cpu] [--threads 1]

Inverting Gradients (Geiping et al. 2020, arXiv 2003.14053) on ConvNet-64 (or LeNet) with
eval-mode BatchNorm, batch 1, 32 px, photo 0 (astronaut), labels known, the library's default
configuration except ``iterations``. Three runs in this process, one after the other:

- ``eager``: ``compile=False`` (the default);
- ``compiled, cold``: ``compile=True`` with an empty Inductor cache (a fresh temporary folder):
  what the first target of a session pays, compilation included;
- ``compiled, warm``: ``compile=True`` again with a new attack object: Dynamo traces again, the
  Inductor kernels come from the cache (what every later target of the same shape pays).

Per run: wall seconds, the break-even against eager, final PSNR, and the largest pixel
difference from the eager reconstruction (the compiled step reorders float sums, which
sign-Adam can amplify over a long run; the test suite checks 20 iterations to 1e-4). Writes
``benchmarks/results/compile_run[-DEVICE].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gradleak-inductor-"))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))
from bench import RESULTS  # noqa: E402
from compile_step import photo_update  # noqa: E402

MODELS = {"convnet": ("convnet", {"width": 64}, "ConvNet-64"), "lenet": ("lenet", {}, "LeNet")}


def run(model: str, iterations: int, device: str) -> list[dict]:
    import torch

    import gradleak as gl
    from gradleak.metrics import psnr

    name, options, label = MODELS[model]
    built, images, update = photo_update(name, options, device)
    rows, eager = [], None
    for way, compiled in (("eager", False), ("compiled, cold", True), ("compiled, warm", True)):
        attack = gl.get_attack("inverting-gradients")(built.module, gl.ThreatModel(), iterations=iterations,
                                                      compile=compiled)
        start = time.perf_counter()
        result = attack.reconstruct(update)
        if built.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        eager = result.images if eager is None else eager
        rows.append({"model": label, "way": way, "iterations": iterations, "seconds": seconds,
                     "psnr": float(psnr(result.images.clamp(0, 1), images).mean()),
                     "max_abs_pixel_difference": float((result.images - eager).abs().max()),
                     "load": os.getloadavg()[0]})
        print(f"  {label} {way}: {seconds:.1f} s, {rows[-1]['psnr']:.2f} dB", flush=True)
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1200)
    parser.add_argument("--model", choices=list(MODELS), default="convnet")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from gradleak._io import atomic_write_json

    torch.set_num_threads(args.threads)
    rows = run(args.model, args.iterations, args.device)
    print(f"\n| model | way | iterations | seconds | speed-up vs eager | PSNR dB | max abs pixel diff vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['way']} | {r['iterations']} | {r['seconds']:.1f} | {r['speedup']:.2f} | "
              f"{r['psnr']:.2f} | {r['max_abs_pixel_difference']:.1e} |")
    suffix = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    out = RESULTS / f"compile_run{suffix}.json"
    atomic_write_json(out, {"torch": torch.__version__, "device": args.device, "threads": args.threads,
                            "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
