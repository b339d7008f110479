"""Running an audit: every cell of the grid, stored as it finishes; the utility runs; the verdicts.

Layout of the output folder::

    OUT/
      report.html              the audit report (tables, privacy-utility picture, verdicts)
      audit.json, cells.csv    every number of the report
      privacy_utility.png, psnr_by_defense.png
      cells/<cell-id>/         one run folder per cell (grid.png, metrics.json, report.html, ...)
                  cell.json    written last: its presence marks the cell finished
      utility/<id>.json        one federated training per defense entry

A cell is (model, attack, defense entry, batch size), run on all ``data.n`` images. Its id
carries a hash of everything that determines it, so an interrupted audit run again with
the same config continues where it stopped, and a changed cell is recomputed. A group of cells
(``audit/_batch.py``: sharing their client updates, or attacked together) runs here, in a
worker process (``audit/_pool.py``) or as one Ray task (``audit/_ray.py``); this process
stores them. The cells themselves are computed by ``_group.run_group``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json
from ..data.spec import DataSpec
from ..errors import ConfigError
from ..models import resolve_device
from ..report.audit import write_audit_report
from ._batch import cell_groups, plan_groups
from ._group import CellSpec, levels, run_group
from ._pool import ProcessPool, resolve_jobs
from ._ray import RayBackend
from .cell import defense_label as _defense_label
from .cell import numbers as _numbers
from .cell import stored_record as _stored
from .config import AuditConfig, load_audit_config
from .results import AuditResult, CellResult
from .utility import run_utility, stored_utility, train_models
from .verdict import audit_verdicts

__all__ = ["CellSpec", "CellResult", "AuditResult", "run_audit", "audit_cells", "cell_groups", "run_group",
           "run_utility", "stored_utility", "mean_image_psnr"]

log = logging.getLogger(__name__)


def mean_image_psnr(images: torch.Tensor) -> float | None:
    """Mean PSNR, over the images, of the average of the *other* images against each one: what
    a guess that knows the data but nothing of this image scores. A reconstruction near this
    value carries no information about its image. None for a single image."""
    from ..metrics import psnr

    n = images.shape[0]
    if n < 2:
        return None
    others = (images.sum(0, keepdim=True) - images) / (n - 1)
    return float(psnr(others, images).mean())


def audit_cells(config: AuditConfig) -> list[CellSpec]:
    """The grid in the order it runs: model, batch size, defense, attack (innermost)."""
    stacks = config.defense_stacks()
    return [CellSpec(m, a, k, tuple(d.describe() for d in stacks[k]), b)
            for m in config.models for b in config.batch_sizes for k in range(len(stacks)) for a in config.attacks
            if a.applies_to(m)]


def _load_cell(stored: dict[str, Any], spec: "CellSpec", config: AuditConfig, label: str) -> CellResult:
    """A stored cell as the current config names and judges it (labels, position, verdict levels)."""
    cell = CellResult(**_numbers(stored["result"]))
    cell.defense, cell.defense_index = label, spec.defense_index
    if cell.status == "done":
        cell.levels = levels(cell, config.verdict)
    return cell


def _load_context(config: AuditConfig) -> dict[str, Any]:
    """The attacked images on the audit's device and dtype, with what every cell needs of them."""
    from ..data import load_dataset

    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    device = resolve_device(config.device)
    data = config.data  # keys and values checked by AuditConfig
    dataset = load_dataset(data["name"], size=data.get("size"), n=data["n"])
    images = dataset.images.to(device=device, dtype=dtype)
    return {"images": images, "labels": dataset.labels.to(device), "classes": dataset.classes, "device": device,
            "spec": DataSpec.from_images(images), "weights": {}}


def _stored_cells(config: AuditConfig, specs: list[CellSpec], stacks: list[list[Any]], out: Path,
                  resume: bool) -> tuple[dict[int, CellResult], list[int]]:
    """The cells a previous run (local or Ray) stored, by grid position, and the positions to compute."""
    found = {i: _stored(out / "cells" / s.cell_id(config) / "cell.json", s.key(config)) if resume else None
             for i, s in enumerate(specs)}
    done = {i: _load_cell(found[i], s, config, _defense_label(stacks[s.defense_index]))
            for i, s in enumerate(specs) if found[i] is not None}
    return done, [i for i in range(len(specs)) if i not in done]


def _run_local(config: AuditConfig, specs: list[CellSpec], groups: list[list[int]], stacks: list[list[Any]],
               context: dict[str, Any], out: Path, store, progress) -> None:
    """The groups in this process, one after the other (``RayBackend.run`` is the same on Ray)."""
    for group in groups:
        members = [specs[i] for i in group]
        cells = run_group(config, members, [stacks[s.defense_index] for s in members], context, out, progress)
        for index, cell in zip(group, cells):
            store(index, cell)


def _run_pool(pool: ProcessPool, config: AuditConfig, specs: list[CellSpec], groups: list[list[int]],
              stacks: list[list[Any]], context: dict[str, Any], out: Path, store, progress, utility: dict[int, Any],
              resume: bool, advance) -> bool:
    """Cells and utility trainings in worker processes; stored utility results are reused here.
    False (nothing run) when fewer than two tasks are left: they run in this process."""
    todo = []
    if config.utility is not None:
        for index, stack in enumerate(stacks):
            stored = stored_utility(stack, config, out) if resume else None
            if stored is None:
                todo.append(index)
            else:
                utility[index] = stored
                advance()

    def utility_done(index: int, result: dict) -> None:
        utility[index] = result
        advance()

    if len(groups) + len(todo) < 2:
        return False
    pool.run(config, specs, groups, stacks, context, out, store, progress, todo, utility_done, resume)
    return True


def run_audit(config: AuditConfig | str | Path, out: str | Path, *, quiet: bool = False, resume: bool = True,
              ray: str | bool | None = None, workers: int | None = None, jobs: int | str | None = None) -> AuditResult:
    """Run every cell of ``config`` (skipping those already stored in ``out`` when ``resume``),
    the utility trainings, and write the report. Ctrl-C stops after storing what finished
    and still writes the report of what is there.

    ``jobs``: local worker processes (one torch thread each; ``"auto"``: one per CPU) that
    compute groups of cells and the utility trainings side by side (``audit/_pool.py``);
    None or 1: everything in this process. ``ray``: run the cells as Ray tasks: ``"auto"`` on
    a local Ray of ``workers`` CPUs started when a cell is left to compute, or the
    ``HOST:PORT`` of a running cluster (see ``audit/_ray.py``). A cell's numbers do not
    depend on where it ran: runs resume each other."""
    from ..pipeline import progress_bar

    if not isinstance(config, AuditConfig):
        config = load_audit_config(config)
    run_cells = _run_local if ray is None or ray is False else RayBackend(ray, workers).run  # checked up front
    if run_cells is _run_local and workers is not None:
        raise ConfigError("workers: only with ray (a local Ray or a cluster address)")
    pool = ProcessPool(jobs) if resolve_jobs(jobs) > 1 else None
    if pool is not None and run_cells is not _run_local:
        raise ConfigError("jobs: local worker processes or Ray, not both (Ray's workers: --workers)")
    out = Path(out)
    context = _load_context(config)
    atomic_write_json(out / "config.json", config.to_json())
    baseline = mean_image_psnr(context["images"])
    specs = audit_cells(config)
    stacks = config.defense_stacks()
    finished: dict[int, CellResult] = {}
    utility: dict[int, dict[str, Any]] = {}

    def result(interrupted: bool) -> AuditResult:
        cells = [finished[i] for i in sorted(finished)]
        return AuditResult(out, config, cells, utility, audit_verdicts(cells, config.verdict), interrupted, baseline)

    with progress_bar(quiet) as progress:
        try:
            train_models(config, out, context, progress, resume)
        except KeyboardInterrupt:  # nothing of a half-trained model is used: report what is stored, stop
            write_audit_report(result(True))
            return result(True)
        trainings = len(stacks) if config.utility else 0
        overall = progress.add_task(f"audit: {len(specs)} cells" + (f" + {trainings} utility trainings" if trainings
                                                                     else "") + " done", total=len(specs) + trainings)

        def store(index: int, cell: CellResult) -> None:  # in the driver, as each cell arrives: atomic
            if index in finished:  # stored before; computed again with the cells batched with it
                return
            spec = specs[index]
            atomic_write_json(out / "cells" / spec.cell_id(config) / "cell.json",
                              {"key": spec.key(config), "result": cell.to_json()})
            finished[index] = cell
            progress.advance(overall)

        interrupted = False
        try:
            stored, todo = _stored_cells(config, specs, stacks, out, resume)
            finished.update(stored)
            progress.advance(overall, len(stored))
            groups = plan_groups(config, specs, stacks, todo, context)
            pooled = pool is not None and _run_pool(pool, config, specs, groups, stacks, context, out, store, progress,
                                                    utility, resume, lambda: progress.advance(overall))
            if groups and not pooled:
                run_cells(config, specs, groups, stacks, context, out, store, progress)
            if config.utility is not None:
                for index, stack in enumerate(stacks):
                    if index not in utility:
                        utility[index] = run_utility(stack, config, out, progress, resume)
                        progress.advance(overall)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("audit interrupted after %d of %d cells; finished cells are stored, run again to continue",
                        len(finished), len(specs))
        except Exception:
            # a bug or an exhausted device: report what finished before the error propagates
            write_audit_report(result(True))
            raise
    final = result(interrupted)
    write_audit_report(final)
    return final
