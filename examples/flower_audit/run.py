"""Run the audited Flower app in Flower's simulation engine (Ray), offline, and write the report.

    .venv/bin/python examples/flower_audit/run.py --out runs/flower-audit

writes ``runs/flower-audit/report.html`` (per round and client: reconstructions, scores,
verdicts with their reasons; leakage as the global model trains; the secure-aggregation
sum; the client gates' decisions), ``audit.json``, ``leakage.png``, ``grids/``, the
captured updates in ``updates/round-XXX/`` (attack one later with ``gradleak attack``) and
``final.safetensors`` (the trained global model); an earlier run's ``nodes/``, ``updates/``
and ``grids/`` in the same folder are removed first. ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _offline_environment(out: Path) -> None:
    """No network, no dependency installation, Flower's files in a temporary folder."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/flower-audit", help="report folder (default: %(default)s)")
    parser.add_argument("--data", default="digits", choices=("digits", "faces"), help="built-in real images")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--model", default="lenet", help="zoo name or package.module:factory (default: %(default)s)")
    parser.add_argument("-m", "--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a model option (zoo option or factory keyword), value as JSON or text; repeatable")
    parser.add_argument("--clients", type=int, default=4, help="simulated clients, 4-10 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=300, help="Inverting Gradients iterations per attack")
    parser.add_argument("--gate", default="defense", choices=("defense", "block", "off"),
                        help="what the clients' leakage gate does above its threshold (default: %(default)s)")
    parser.add_argument("--gate-defense", default="gaussian:variance=1e-4", help="the gate's defense spec")
    parser.add_argument("--gate-threshold", type=float, default=18.0, help="gate threshold, dB PSNR")
    parser.add_argument("--no-audit", action="store_true", help="plain FedAvg (to compare the trained model)")
    parser.add_argument("--client-cpus", type=float, default=0.5, help="CPUs Ray reserves per client")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    _offline_environment(out)
    for stale in ("nodes", "updates", "grids"):    # an earlier run's: its node ids would mix with this run's
        shutil.rmtree(out / stale, ignore_errors=True)
    sys.path.insert(0, str(HERE))          # Ray's workers import this folder's app module (PYTHONPATH)
    import torch
    from safetensors.torch import save_file

    import app
    from flwr.simulation import run_simulation
    from gradleak.flower import write_report

    torch.set_num_threads(1)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("gradleak.flower").addHandler(handler)
    logging.getLogger("gradleak.flower").setLevel(logging.INFO)
    settings = app.Settings(out=str(out), data=args.data, size=args.size, model=args.model,
                            model_options=_options(args.model_option), clients=args.clients,
                            rounds=args.rounds, lr=args.lr, gate=args.gate, gate_defense=args.gate_defense,
                            gate_threshold=args.gate_threshold, audit=not args.no_audit, seed=args.seed,
                            attacks=(("rgap", ()), ("inverting-gradients", (("iterations", args.iterations),))))
    strategy = app.make_strategy(settings)
    results: dict = {}
    start = time.perf_counter()
    run_simulation(app.make_server_app(settings, strategy, results), app.make_client_app(settings),
                   num_supernodes=settings.clients,
                   backend_config={"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
                                   "init_args": {"address": "local", "num_cpus": os.cpu_count() or 2,
                                                 "include_dashboard": False}})
    wall = time.perf_counter() - start
    if "arrays" not in results:
        print("the simulation ended without a trained model (see the log above)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in results["arrays"].to_torch_state_dict().items()},
              str(out / "final.safetensors"))
    accuracy = results.get("accuracy", {})
    print(f"wall time {wall:.0f} s; held-out accuracy by round: "
          + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in sorted(accuracy.items())))
    if args.no_audit:
        return 0
    names = _names(settings)
    notes = [f"{settings.clients} simulated clients on built-in {settings.data} at {settings.size} px, model "
             f"{settings.spec.label}, {settings.rounds} rounds of FedAvg, lr {settings.lr}, {settings.epochs} local "
             f"epoch(s); clients' (examples, minibatch): "
             + ", ".join(f"{settings.client_plan(k)}" for k in range(settings.clients)),
             f"client gate: {settings.gate}" + (f" with {settings.gate_defense}" if settings.gate == "defense" else "")
             + f" above {settings.gate_threshold} dB", f"simulation wall time {wall:.0f} s (Flower + Ray start-up, "
             "training, gates and the in-line audit)"]
    started = time.perf_counter()
    report = write_report(out, strategy, names=names, accuracy=accuracy, wall_seconds=wall, notes=notes)
    print(f"report written in {time.perf_counter() - started:.0f} s")
    for record in sorted(strategy.records, key=lambda r: (r.server_round, r.node_id is None, r.client or "",
                                                          r.node_id or 0)):
        print(record.line())
    print(f"report: {report}")
    return 0


def _options(pairs: list[str]) -> tuple[tuple[str, object], ...]:
    import json

    options = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-option {pair!r}: expected KEY=VALUE")
        try:
            options.append((key, json.loads(value)))
        except json.JSONDecodeError:
            options.append((key, value))
    return tuple(options)


def _names(settings) -> dict[int, str]:
    """Node id -> 'client k', from the partition each simulated client noted."""
    import json

    names = {}
    for path in (Path(settings.out) / "nodes").glob("node-*.json"):
        names[int(path.stem.split("-", 1)[1])] = f"client {json.loads(path.read_text())['partition']}"
    return names


if __name__ == "__main__":
    sys.exit(main())
