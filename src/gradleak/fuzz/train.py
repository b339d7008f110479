"""Hostile ``gradleak train`` command lines, run through the command itself.

``train`` takes sizes, counts, rates, client settings, data paths, model names and weights:
each must train and write a complete folder, or be refused with one line (exit status 2)
before anything is written or allocated out of bounds. Each input is a command line built
from a small valid training with one kind of edit:

- ``sizes``: ``--size``, ``--n``, ``--epochs``, ``--batch-size``, ``--clients``, ``--checkpoint``,
  ``--eval-every`` out of range (the issue's ``--size 100000`` among them) or not numbers;
- ``rates``: ``--lr``, ``--weight-decay``, ``--server-lr``, ``--test-fraction`` NaN, infinite,
  negative, overflowing;
- ``clients``: ``--client key=value`` pairs with unknown keys, hostile values, no ``=``;
- ``paths``: data, weights and output paths that are missing, special files, too long, files
  where folders should be;
- ``names``: model names and options in the forms the name checks must catch;
- ``valid``: small trainings that must succeed.

An input whose command exited 2 must have written nothing (no output folder, no staging folder).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from ._engine import Campaign, Refused, run_inputs

__all__ = ["KINDS", "hostile_commands", "run_train"]

KINDS = ("sizes", "rates", "clients", "paths", "names", "valid")

_INTS = ["0", "-1", "1", "3", "513", "100000", "1000000", "2147483648", "99999999999999999999", "x", "1.5", "",
         "nan", "1e3"]
_FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e400", "-1e-300", "1e308", "x", "", "0.5", "1", "1.5"]
_PAIRS = ["lr=nan", "lr=-1", "local_steps=0", "local_steps=1000000000", "colour=1", "=", "lr", "protocol=fedprox",
          "batch_size=99999999", "epochs=0", "local_batch_size=0", "seed=-1", "lr=1e400", "protocol=fedsgd",
          "local_steps=2", "share_labels=maybe"]
_NAMES = [" mlp", "mlp ", "MLP", "ｍｌｐ", "m\u200blp", "mlp\n", "lenet", "os:getcwd", "os::getcwd", "", "x" * 300,
          "no_such_module_here:f", "../mlp"]
_OPTIONS = ["hidden=0", "hidden=-1", "hidden=100000000", "hidden=x", "colour=1", "hidden", "=1", "width=3"]


def _base(rng: random.Random, out: Path) -> list[str]:
    data = rng.choice(["digits", "faces", "photos"])
    return ["train", "--model", "mlp", "-m", "hidden=16", "--data", data,
            "--n", str(rng.choice([10] if data == "photos" else [10, 20, 32])), "--size", str(rng.choice([8, 12])), "--epochs",
            str(rng.choice([1, 2])), "--device", "cpu", "--out", str(out), "-q"]


def _set(args: list[str], option: str, value: str) -> list[str]:
    if option in args:
        at = args.index(option)
        return args[: at + 1] + [value] + args[at + 2 :]
    return [*args, option, value]


def _edit(rng: random.Random, kind: str, args: list[str], folder: Path) -> list[str]:
    if kind == "sizes":
        option = rng.choice(["--size", "--n", "--epochs", "--batch-size", "--clients", "--checkpoint", "--eval-every"])
        values = _INTS if option != "--epochs" else [v for v in _INTS if v not in ("513", "100000", "1e3")]
        return _set(args, option, rng.choice(values))  # (a valid 100,000 epochs would only be slow)
    if kind == "rates":
        return _set(args, rng.choice(["--lr", "--weight-decay", "--server-lr", "--test-fraction"]),
                    rng.choice(_FLOATS))
    if kind == "clients":
        args = _set(args, "--clients", rng.choice(["2", "3"])) if rng.random() < 0.7 else args
        return [*args, "-c", rng.choice(_PAIRS)]
    if kind == "paths":
        option = rng.choice(["--data", "--weights", "--out"])
        fifo = folder / "fifo"
        value = rng.choice([str(folder / "no/such/folder"), "/dev/zero", "/proc/self/mem", str(fifo),
                            str(folder / "file.txt"), str(folder / "file.txt" / "below"), "", str(folder / ("n" * 300)),
                            "/", str(folder / "empty")])
        if option == "--out" and value in ("/", "/dev/zero", "/proc/self/mem"):
            value = rng.choice(["/proc/gradleak-run", str(fifo), str(folder / "file.txt")])  # never write outside
        return _set(args, option, value)
    if kind == "names":
        if rng.random() < 0.6:
            return _set(args, "--model", rng.choice(_NAMES))
        return _set(args, "-m", rng.choice(_OPTIONS))
    return args


def hostile_commands(folder: Path, n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` command lines (and the files they name) under ``folder``: ``[(kind, argv)]``."""
    import os

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "file.txt").write_text("not data\n")
    (folder / "empty").mkdir(exist_ok=True)
    if not (folder / "fifo").exists():
        os.mkfifo(folder / "fifo")
    inputs = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        out = folder / "runs" / f"train-{index:06d}"
        inputs.append((kind, _edit(rng, kind, _base(rng, out), folder)))
    return inputs


def _out(argv: list[str]) -> Path:
    return Path(argv[argv.index("--out") + 1])


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name the file system refuses
        return False


def run_train(folder: Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Campaign:
    """Run ``n`` hostile ``gradleak train`` command lines in this process (typer's runner)."""
    import torch
    from typer.testing import CliRunner

    from ..cli import app

    runner = CliRunner()
    effects: list[str] = []
    threads = torch.get_num_threads()

    def load(argv: list[str]) -> Path:
        out = _out(argv)
        existed = _exists(out)
        result = runner.invoke(app, argv)
        torch.set_num_threads(threads)
        if out.name and _exists(out.parent) and any(out.parent.glob(f".{out.name}.partial-*")):
            effects.append(f"{' '.join(argv)[:200]}: left a staging folder")
        if result.exit_code == 0:
            return out
        if result.exit_code == 2 and result.stderr.startswith("error: "):
            if not existed and _exists(out):
                effects.append(f"{' '.join(argv)[:200]}: refused, yet wrote {out}")
            raise Refused(result.stderr.strip())
        raise RuntimeError(f"exit {result.exit_code}: {result.stderr.strip()[:200] or result.output[:200]}")

    def check(out: Path) -> None:
        if not ((out / "weights.safetensors").is_file() and (out / "training.json").is_file()):
            raise ValueError(f"{out} lacks weights.safetensors or training.json")

    campaign = run_inputs("train", hostile_commands(folder, n, seed), load, check, describe=lambda argv: "",
                          progress=progress)
    campaign.side_effects.extend(effects)
    return campaign


run = run_train  # the surface's entry point for gradleak.fuzz.run_surface
