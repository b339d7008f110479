"""Malicious-server attacks: how many of B images come back, at which batch sizes.

    .venv/bin/python benchmarks/malicious.py imprint        # B = 8, 32, 128 (faces), 256 (digits)
    .venv/bin/python benchmarks/malicious.py trap           # B = 8, 32, 64 (faces, 1000-unit MLP)
    .venv/bin/python benchmarks/malicious.py fishing        # B = 8, 32, 64 (digits, LeNet)

For each: images recovered exactly (PSNR >= 60 dB after matching) or recognisably (>= 18 dB)
out of B, mean PSNR of those recovered, seconds per update. The server's public images are
other images of the same source (after the attacked ones).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradleak as gl
from gradleak.pipeline import DataRequest, attack_simulated


def _row(name, B, run, seconds):
    psnrs = [r["psnr"] for r in run.scores.per_image if r["psnr"] is not None]
    exact = [p for p in psnrs if p >= 60]
    recognisable = [p for p in psnrs if p >= 18]
    mean = statistics.fmean(recognisable) if recognisable else float("nan")
    print(f"| {name} | {B} | {len(exact)} | {len(recognisable)} | {mean:.1f} | {seconds:.1f} |", flush=True)


def _run(attack, data, model, B, options, out):
    started = time.perf_counter()
    run = attack_simulated(attack, out, data=data, model=model, client=gl.ClientSetup(batch_size=B),
                           threat=gl.ThreatModel(server="malicious"), options=options, quiet=True)
    return run, time.perf_counter() - started


def imprint():
    print("| attack | B | exact (>= 60 dB) | recognisable (>= 18 dB) | mean PSNR of those (dB) | seconds |")
    for B, data in ((8, DataRequest("faces", 8, None)), (32, DataRequest("faces", 32, None)),
                    (128, DataRequest("faces", 128, None)), (256, DataRequest("digits", 256, 16))):
        run, seconds = _run("imprint", data, "lenet", B, {"bins": 8 * B}, f"benchmarks/results/malicious/imprint-{B}")
        _row(f"imprint, {8 * B} bins, {data.name}", B, run, seconds)


def trap():
    print("| attack | B | exact (>= 60 dB) | recognisable (>= 18 dB) | mean PSNR of those (dB) | seconds |")
    for B in (8, 32, 64):
        model = gl.ModelSpec("mlp", {"hidden": "2000"})
        run, seconds = _run("trap-weights", DataRequest("faces", B, None), model, B, {"rate": 0.01},
                            f"benchmarks/results/malicious/trap-{B}")
        _row("trap weights, 2000 units, rate 0.01, faces", B, run, seconds)


def fishing():
    from gradleak.data import load_builtin

    print("| attack | B | exact (>= 60 dB) | recognisable (>= 18 dB) | mean PSNR of those (dB) | seconds |")
    for B in (8, 32, 64):
        labels = load_builtin("digits", n=B).labels.tolist()
        counts = {c: labels.count(c) for c in range(10)}
        target = min(counts, key=lambda c: (counts[c] == 0, counts[c]))
        run, seconds = _run("fishing", DataRequest("digits", B, 16), "lenet", B, {"target": target, "iterations": 1000},
                            f"benchmarks/results/malicious/fishing-{B}")
        print(f"(class {target} occurs {counts[target]} time(s) in the batch)")
        _row(f"fishing class {target}, LeNet, digits 16 px", B, run, seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("imprint", "trap", "fishing"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"imprint": imprint, "trap": trap, "fishing": fishing}[args.what]()
