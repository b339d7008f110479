"""torch.compile of the gradient-matching step: plain autograd against compiled, same objective.

    .venv/bin/python benchmarks/compile_step.py [--device cpu] [--evaluations 20] [--threads 1]

The step is one evaluation of the Inverting Gradients matching loss (Geiping et al. 2020,
arXiv 2003.14053: 1 - cosine over all layers + TV 1e-2) and of its gradient with respect to
the candidate image, built as the engine builds it: ``GradientMatching._problem(update)
.objective`` called as ``objective(x, None, None, functional=False)`` with
``torch.autograd.grad`` of its value with respect to ``x`` (the engine's one-restart
evaluator). Three ways of evaluating it, on DLG's LeNet and on ConvNet-64 (eval-mode
BatchNorm), batch 1, 32 px, photo 0 (astronaut), labels inferred:

- ``plain``: the engine's call, eager;
- ``compile(autograd)``: ``torch.compile`` of that same function (Dynamo has to trace
  ``torch.autograd.grad`` with ``create_graph=True`` inside it, or break the graph there);
- ``compile(func.grad)``: ``torch.compile(torch.func.grad_and_value(objective))`` with the
  objective's functional path (the one the engine vmaps over restarts).

Per way: compile time (first call, less one eager evaluation), seconds per evaluation
(median of ``--evaluations`` after the first), the speed-up over ``plain`` measured in the
same run, the loss, and the largest absolute difference of the image gradient from
``plain``'s next to the gradient's largest entry ("agrees": within 1e-4 of it). Dynamo
breaks the graph at ``torch.autograd.grad``; the double backward through an Inductor-compiled
piece is not supported (pytorch/pytorch#91469, #181581), and where it is not refused it
silently drops that piece's dependence on ``x``: hence the check.
Inductor starts from an empty cache (a fresh temporary folder), so the compile time is a
cold one. Writes ``benchmarks/results/compile_step.json``. A way that fails to compile is
reported with its error on one line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gradleak-inductor-"))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # one process at a time on this machine

sys.path.insert(0, str(Path(__file__).parent))
from bench import RESULTS  # noqa: E402

AGREE = 1e-4  # a compiled gradient agrees when it is within 1e-4 of the plain one's largest entry
MODELS = {"LeNet": ("lenet", {}), "ConvNet-64": ("convnet", {"width": 64})}


def photo_update(model_name: str, options: dict, device: str):
    """(built model, images, update): the zoo model in eval mode and the FedSGD update of photo
    0 (astronaut, 32 px, its label) on it; the case this script and ``compile_run.py`` measure."""
    import gradleak as gl
    from gradleak.data import load_builtin

    photos = load_builtin("photos", size=32, n=1)
    built = gl.ModelSpec(model_name, options, device=device, mode="eval").build((3, 32, 32), 10)
    images, labels = photos.images.to(built.device), photos.labels.to(built.device)
    return built, images, gl.fedsgd_update(built.module, images, labels, loss=built.loss)


def step_functions(model_name: str, options: dict, device: str):
    """(plain, functional, x) for one model: the engine's evaluation of the matching loss and
    its image gradient, the same through ``torch.func``, and a candidate (seeded randn)."""
    import torch

    import gradleak as gl

    built, images, update = photo_update(model_name, options, device)
    attack = gl.get_attack("inverting-gradients")(built.module, gl.ThreatModel())
    objective = attack._problem(update).objective

    def plain(x):
        x = x.detach().requires_grad_(True)
        value = objective(x, None, None, functional=False)
        return torch.autograd.grad(value, x)[0], value.detach()

    grad_and_value = torch.func.grad_and_value(lambda x: objective(x, None, None, functional=True))
    x = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(built.device)
    return plain, grad_and_value, x


def _timed(fn, x, evaluations: int, sync) -> tuple[float, list[float], tuple]:
    """(seconds of the first call, seconds of the next ``evaluations``, the first call's result)."""
    start = time.perf_counter()
    first = fn(x)
    sync()
    took = time.perf_counter() - start
    times = []
    for _ in range(evaluations):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return took, times, first


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def measure(label: str, device: str, evaluations: int) -> list[dict]:
    """The three ways on one model; each row: way, compile s, s/evaluation, speed-up, max |diff|."""
    import torch

    torch._dynamo.reset()
    plain, functional, x = step_functions(*MODELS[label], device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    _, times, (reference, value) = _timed(plain, x, evaluations, sync)
    base = statistics.median(times)
    rows = [{"model": label, "way": "plain", "compile_seconds": None, "seconds_per_evaluation": base,
             "speed_up": 1.0, "max_abs_grad_diff": 0.0, "max_abs_grad": float(reference.abs().max()),
             "loss": float(value), "error": None, "agrees": True}]
    for way, fn in (("compile(autograd)", plain), ("compile(func.grad)", functional)):
        row = {"model": label, "way": way, "compile_seconds": None, "seconds_per_evaluation": None,
               "speed_up": None, "max_abs_grad_diff": None, "max_abs_grad": None, "loss": None, "error": None,
               "agrees": None}
        try:
            took, times, (gradient, loss) = _timed(torch.compile(fn), x, evaluations, sync)
            per = statistics.median(times)
            row.update(compile_seconds=took - base, seconds_per_evaluation=per, speed_up=base / per,
                       max_abs_grad_diff=float((gradient - reference).abs().max()),
                       max_abs_grad=float(gradient.abs().max()), loss=float(loss))
            row["agrees"] = row["max_abs_grad_diff"] <= AGREE * rows[0]["max_abs_grad"]
        except Exception as error:  # noqa: BLE001  a failed compile is a finding to report
            row["error"] = _one_line(error)
        rows.append(row)
        print(f"{label} {way}: {row['error'] or f'{per:.4f} s/eval'}, load {os.getloadavg()[0]:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | way | compile s | s/evaluation | speed-up vs plain | loss | max abs gradient "
             "| max abs gradient diff | agrees | error |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['model']} | {r['way']} | {f(r['compile_seconds'], '.1f')} | "
                     f"{f(r['seconds_per_evaluation'], '.4f')} | {f(r['speed_up'], '.2f')} | {f(r['loss'], '.6f')} | "
                     f"{f(r['max_abs_grad'], '.2e')} | {f(r['max_abs_grad_diff'], '.1e')} | "
                     f"{'-' if r['agrees'] is None else 'yes' if r['agrees'] else 'NO'} | {r['error'] or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--evaluations", type=int, default=20, help="timed evaluations per way")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", help="JSON file (default benchmarks/results/compile_step[-DEVICE].json)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from gradleak._io import atomic_write_json

    began, rows = time.perf_counter(), []
    for label in args.models:
        rows += measure(label, args.device, args.evaluations)
    print(f"\n{time.perf_counter() - began:.0f} s, torch {torch.__version__}, {args.device}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print(table(rows))
    suffix = "" if args.device == "cpu" else f"-{args.device.replace(':', '')}"
    out = Path(args.out) if args.out else RESULTS / f"compile_step{suffix}.json"
    atomic_write_json(out, {"torch": torch.__version__, "device": args.device, "load_average": os.getloadavg(),
                            "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
