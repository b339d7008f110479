"""Fuzzing gradleak's untrusted-input surfaces: generated hostile inputs, counted outcomes.

Each surface is a door through which someone else's bytes or words reach gradleak:

| surface | the door | module |
| --- | --- | --- |
| ``updates`` | a client's update file (``load_update``) | :mod:`gradleak.fuzz.updates` |
| ``weights`` | ``--weights`` / an audit model's ``weights:`` (``read_weights`` + ``apply_weights``) | :mod:`gradleak.fuzz.weights` |
| ``factories`` | the user's ``package.module:factory`` (``ModelSpec.build``) | :mod:`gradleak.fuzz.factories` |
| ``configs`` | an audit config someone sent (``load_audit_config``), model names in every form | :mod:`gradleak.fuzz.configs` |
| ``train`` | ``gradleak train``'s options, through the command line | :mod:`gradleak.fuzz.train` |

Every input must load fully valid or be refused with one line, never escape as another
exception, never run a pickle or import code without permission, in bounded time and memory
(:class:`~gradleak.fuzz._engine.Campaign`). ``python -m gradleak.fuzz --surface all --n 10000``
runs the long campaign (``benchmarks/fuzz_surfaces.py``); the suite runs a seeded sample of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

from ._engine import Campaign, print_campaign
from .updates import KINDS, hostile_inputs, run_campaign, seed_updates

__all__ = ["KINDS", "SURFACES", "Campaign", "hostile_inputs", "run_campaign", "run_surface", "seed_updates", "main"]


def _surface(name: str):
    """The module of a surface: each has ``KINDS`` and ``run(folder, n, seed, progress=None)``."""
    import importlib

    if name not in SURFACES:
        raise ValueError(f"unknown surface {name!r}; surfaces: {', '.join(SURFACES)}")
    return importlib.import_module(f"{__name__}.{name}")


SURFACES = ("updates", "weights", "factories", "configs", "train")


def run_surface(surface: str, folder: Path, n: int, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> Campaign:
    """``n`` seeded hostile inputs of one surface, written under ``folder`` and fed to its door."""
    return _surface(surface).run(Path(folder), n, seed, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz gradleak's untrusted-input surfaces.")
    parser.add_argument("--surface", choices=[*SURFACES, "all"], default="all")
    parser.add_argument("--n", type=int, default=10_000, help="hostile inputs per surface")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the counts per surface here")
    args = parser.parse_args(argv)
    surfaces = SURFACES if args.surface == "all" else (args.surface,)
    clean = True
    results = []
    for surface in surfaces:
        with tempfile.TemporaryDirectory() as tmp:
            campaign = run_surface(surface, Path(tmp) / surface, args.n, args.seed)
        print_campaign(campaign, _surface(surface).KINDS)
        results.append(campaign.summary())
        clean = clean and campaign.clean
    if args.json is not None:
        from .._io import atomic_write_json

        atomic_write_json(args.json, results)
    print(json.dumps(results, indent=1))
    return 0 if clean else 1
