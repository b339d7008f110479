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
stores them.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from .._io import atomic_write_json
from ..attacks.base import Reconstruction
from ..client import ClientSetup
from ..data.spec import DataSpec
from ..errors import AttackNotApplicable, ConfigError, GradleakError
from ..models import resolve_device
from ..report.audit import write_audit_report
from ._batch import cell_groups, cell_model, plan_groups
from ._pool import ProcessPool, resolve_jobs
from .results import defense_label as _defense_label
from .results import numbers as _numbers
from .results import stored_record as _stored
from .utility import run_utility, stored_utility, train_models
from ._ray import RayBackend
from .config import AuditConfig, AttackChoice, ModelChoice, load_audit_config, stable_hash
from .results import AuditResult, CellResult
from .verdict import audit_verdicts

__all__ = ["CellSpec", "CellResult", "AuditResult", "run_audit", "audit_cells", "cell_groups", "run_group",
           "run_utility", "stored_utility", "mean_image_psnr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellSpec:
    model: ModelChoice
    attack: AttackChoice
    defense_index: int
    defenses: tuple[dict[str, Any], ...]
    batch_size: int

    def key(self, config: AuditConfig) -> dict[str, Any]:
        """Everything that determines the cell's result."""
        return {"model": self.model.key(),
                "attack": {"name": self.attack.name, "options": self.attack.options}, "defenses": list(self.defenses),
                "batch_size": self.batch_size, "data": config.data, "client": config.client, "threat": config.threat,
                "seed": config.seed, "dtype": config.dtype}

    def cell_id(self, config: AuditConfig) -> str:
        defense = "+".join(d["name"] for d in self.defenses) or "none"
        # no grid position in the name: inserting a defense entry must not rename (and recompute) the others
        text = f"{self.model.name}-{self.attack.name}-{defense}-b{self.batch_size}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", text) + "-" + stable_hash(self.key(config))


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


def _levels(cell: "CellResult", rule) -> dict[str, int]:
    ssim = cell.ssim if len(cell.ssim) == len(cell.psnr) else [None] * len(cell.psnr)
    found = [rule.level(p, s) for p, s in zip(cell.psnr, ssim)]
    return {level: found.count(level) for level in ("recognisable", "partial", "none")}


def _load_cell(stored: dict[str, Any], spec: "CellSpec", config: AuditConfig, label: str) -> CellResult:
    """A stored cell as the current config names and judges it (labels, position, verdict levels)."""
    cell = CellResult(**_numbers(stored["result"]))
    cell.defense, cell.defense_index = label, spec.defense_index
    if cell.status == "done":
        cell.levels = _levels(cell, config.verdict)
    return cell


def _served(spec: CellSpec, stack: list[Any], config: AuditConfig, context: dict[str, Any], attack_name: str,
            attack_options: dict[str, Any], served_cache: dict):
    """The cell's model, its attack and the clients' (defended) updates: simulated once per
    (model, defense, batch size) for an honest server, per cell for a malicious one (the
    clients train on the model that attack serves, its public images the data set's images
    after the attacked ones)."""
    from ..attacks.malicious import MaliciousAttack
    from ..data.request import DataRequest
    from ..defenses import defended_updates
    from ..pipeline import make_attack, public_images
    from ..threat import ThreatModel

    images, labels = context["images"], context["labels"]
    key = (spec.model.label, spec.defense_index, spec.batch_size)
    if key not in served_cache:
        served_cache.clear()  # one (model, defense, batch) at a time: attacks are the inner loop
        served_cache[key] = (cell_model(spec, config, context), None)
    built, honest = served_cache[key]
    threat = ThreatModel(**config.threat)
    attack = make_attack(attack_name, built.module, threat, dict(attack_options))
    malicious = isinstance(attack, MaliciousAttack)
    if not malicious and honest is not None:
        return attack, honest
    setup = ClientSetup(**{**config.client, "batch_size": spec.batch_size, "seed": config.seed})
    data_spec = built.data_spec or context["spec"]
    sent, description = built.module, built.description()
    if malicious:   # choosing a malicious-server attack is choosing that threat model; it edits its own copy
        sent = copy.deepcopy(built.module)
        attack = make_attack(attack_name, sent, replace(threat, server="malicious"), dict(attack_options))
        request = DataRequest(config.data["name"], config.data["n"], config.data.get("size"))
        sent = attack.serve(sent, tuple(images.shape[1:]), public_images(request, built, data_spec))
        description = None
    served = defended_updates(sent, images, labels, setup, stack, loss=built.loss, spec=data_spec,
                              model_info=description)
    if not malicious:
        served_cache[key] = (built, served)
    return attack, served


def _cell_result(spec: CellSpec, stack: list[Any], config: AuditConfig) -> CellResult:
    return CellResult(spec.cell_id(config), spec.model.label, spec.attack.name, spec.defense_index,
                      _defense_label(stack), spec.batch_size, "done")


def _run_cell(spec: CellSpec, stack: list[Any], config: AuditConfig, context: dict[str, Any], served_cache: dict,
              out: Path, progress) -> CellResult:
    """One cell alone: its updates (cached for the group), the attack, the scores, its run folder."""
    from ..pipeline import attack_updates

    result = _cell_result(spec, stack, config)
    start = time.perf_counter()
    try:
        attack, served = _served(spec, stack, config, context, spec.attack.name, spec.attack.options, served_cache)
        reconstruction = attack_updates(attack, [d.update for d in served],
                                        truths=[context["images"][d.indices] for d in served], progress=progress)
        _finish_cell(result, spec, attack, served, reconstruction, config, context, out)
    except AttackNotApplicable as error:
        result.status, result.message, result.condition = "not-applicable", str(error), error.condition
    except GradleakError as error:
        result.status, result.message = "error", str(error)
    result.seconds = time.perf_counter() - start
    return result


def _finish_cell(result: CellResult, spec: CellSpec, attack, served: list, reconstruction: Reconstruction,
                 config: AuditConfig, context: dict[str, Any], out: Path) -> None:
    """Score ``reconstruction`` (of the updates ``served``) into ``result`` and write the cell's run folder."""
    from ..runs import write_run

    images, labels = context["images"], context["labels"]
    result.server, result.threat_model = attack.threat.server, attack.threat.sok(attack)["id"]
    result.privacy = next((d.privacy for d in served if d.privacy), {})
    if reconstruction.interrupted or reconstruction.updates < len(served):
        raise KeyboardInterrupt  # Ctrl-C inside the cell: never store (or write) it as finished
    order = [i for d in served[: reconstruction.updates] for i in d.indices]
    run = write_run(out / "cells" / result.cell_id, reconstruction, originals=images[order],
                    true_labels=labels[order], config={"cell": spec.key(config), "privacy": result.privacy,
                                                       "threat_model": attack.threat.sok(attack)})
    result.summary = {k: v for k, v in run.scores.summary.items()}
    rows = {row["index"]: row for row in run.scores.per_image}  # missing: no reconstruction matched this image
    result.psnr = [rows[i]["psnr"] if i in rows else None for i in range(len(order))]
    result.ssim = [rows[i].get("ssim") if i in rows else None for i in range(len(order))]
    result.levels = _levels(result, config.verdict)


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


def run_group(config: AuditConfig, specs: list[CellSpec], stacks: list[list[Any]], context: dict[str, Any],
              out: Path, progress=None) -> Iterator[CellResult]:
    """Compute one group of cells (``audit/_batch.py``; ``stacks``: each cell's defense stack)
    in order, yielding each CellResult as its run folder is written: cells sharing their
    client updates simulate them once; cells of one attack under several defense entries are
    attacked together (:func:`_run_together`). Plain inputs only: a local audit, a worker
    process (``audit/_pool.py``) and a Ray task (``audit/_ray.py``) all run this."""
    from ..pipeline import progress_bar

    progress = progress_bar(True) if progress is None else progress
    served_cache: dict = {}
    if len({spec.defense_index for spec in specs}) > 1:
        yield from _run_together(config, specs, stacks, context, served_cache, out, progress)
        return
    for spec, stack in zip(specs, stacks):
        yield _run_cell(spec, stack, config, context, served_cache, out, progress)


def _run_together(config: AuditConfig, specs: list[CellSpec], stacks: list[list[Any]], context: dict[str, Any],
                  served_cache: dict, out: Path, progress) -> Iterator[CellResult]:
    """Cells of one gradient-matching attack under different defense entries: every cell's
    updates attacked in one ``reconstruct_many`` call (one vmap over all their images), then
    each cell scored and written as if alone. Where one cell's updates or the batch fail,
    the cells run one by one, each naming its own error. Ctrl-C: the cells whose
    reconstructions were finished are yielded, then KeyboardInterrupt."""
    from ..pipeline import reconstruct_each

    start = time.perf_counter()
    try:
        served = [_served(spec, stack, config, context, spec.attack.name, spec.attack.options, {})
                  for spec, stack in zip(specs, stacks)]
        updates = [d.update for _, cell in served for d in cell]
        truths = [context["images"][d.indices] for _, cell in served for d in cell]
        parts, interrupted = reconstruct_each(served[0][0], updates, truths=truths, progress=progress)
    except GradleakError:
        for spec, stack in zip(specs, stacks):
            yield _run_cell(spec, stack, config, context, served_cache, out, progress)
        return
    share = (time.perf_counter() - start) / len(specs)
    for spec, stack, (attack, cell) in zip(specs, stacks, served):
        mine, parts = parts[:len(cell)], parts[len(cell):]
        if len(mine) < len(cell) or any(part.interrupted for part in mine):
            raise KeyboardInterrupt  # Ctrl-C inside the batch: what is left is never stored as finished
        began = time.perf_counter()
        result = _cell_result(spec, stack, config)
        if _stored(out / "cells" / result.cell_id / "cell.json", spec.key(config)) is not None:
            yield result  # stored before (computed again for the others' sake): its folder stays as it is
            continue
        try:
            _finish_cell(result, spec, attack, cell, Reconstruction.concat(mine), config, context, out)
        except GradleakError as error:
            result.status, result.message = "error", str(error)
        result.seconds = share + time.perf_counter() - began
        yield result
    if interrupted:
        raise KeyboardInterrupt


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
        overall = progress.add_task(f"audit: {len(specs)} cells", total=len(specs) + (len(stacks) if config.utility else 0))

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
