"""``gradleak audit CONFIG``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .._io import output_dir
from ._common import QuietOpt, VerboseOpt, app, err, friendly, limited, setup_logging, stdout


@app.command()
@friendly
def audit(
    config: Path = typer.Argument(..., help="Audit config, YAML or TOML (see gradleak.audit.config)."),
    out: Optional[str] = typer.Option(None, help="Audit folder, resumed when it holds this audit (default: "
                                                 "runs/<config name>, prefixed audit- unless it starts so)."),
    fresh: bool = typer.Option(False, "--fresh", help="Recompute every cell instead of continuing a stored audit."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: the "
                                                                 "config's device, else auto)."),
    allow_import: Optional[list[str]] = typer.Option(None, "--allow-import", help="A module whose factories the "
                                                     "config may name (package.module:factory). Repeatable."),
    threads: Optional[int] = limited("workers", None, help="torch threads (default: torch's choice)."),
    ray: bool = typer.Option(False, "--ray", help="Run the cells as Ray tasks on a local Ray started for the audit "
                                                   "(one torch thread each; needs ray: the flower extra)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="HOST:PORT", help="Run the cells on "
                                              "the running Ray cluster there; the audit folder must be shared."),
    workers: Optional[int] = limited("workers", None, "--workers", help="With --ray: Ray CPUs (default: all); "
                                          "with --ray-address: tasks in flight (default: the cluster's CPUs)."),
    jobs: str = typer.Option("auto", "--jobs", help="Local worker processes for the cells and trainings, one torch "
                             "thread each: a number, or auto (one per CPU). 1: all in this process."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
):
    """Run a grid of models x attacks x defenses x batch sizes on real images, train each
    defense federatedly for its accuracy cost, and write one report with verdicts.
    Finished cells are stored as they finish: run the same command again (with or without
    --ray) to continue."""
    import dataclasses

    from ..audit import load_audit_config, run_audit
    from ..errors import ConfigError

    setup_logging(quiet, verbose)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    on_ray = ray_address if ray_address is not None else ("auto" if ray else None)  # '' is refused, not local
    if workers is not None and on_ray is None:
        raise ConfigError("--workers: only with --ray or --ray-address")
    if on_ray is not None:
        jobs = "1"  # Ray schedules the cells itself (--workers)
    from ..text.audit import is_text_config

    stem = config.stem if config.stem.startswith("audit") else f"audit-{config.stem}"   # not runs/audit-audit
    if is_text_config(config):   # modality: text (gradleak.text.audit, docs/text.md)
        from ..text.audit import run_text_audit

        folder = output_dir(Path("runs") / stem if out is None else out)
        run_text_audit(config, folder, quiet=quiet, resume=not fresh)
        if not quiet:
            Console(file=stdout()).print(f"wrote {folder / 'report.html'}", highlight=False)
        return
    cfg = load_audit_config(config, tuple(allow_import or ()))
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    folder = output_dir(Path("runs") / stem if out is None else out)
    result = run_audit(cfg, folder, quiet=quiet, resume=not fresh, ray=on_ray,
                       workers=workers, jobs=jobs)
    if not quiet:
        console = Console(file=stdout())
        for verdict in result.verdicts:
            console.print(f"[{verdict['level']}] {verdict['text']}", highlight=False, soft_wrap=True, markup=False)
        console.print(f"wrote {result.report}", highlight=False)
    if result.interrupted:
        err.print(f"interrupted: {len(result.cells)} finished cell(s) are stored "
                  f"in {folder}; run the same command again to continue", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)
