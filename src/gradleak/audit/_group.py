"""One group of audit cells computed: the cells' client updates, the attack, the scores, the
run folders (:func:`run_group`).

A local audit (``runner.py``), a worker process (``_pool.py``) and a Ray task (``_ray.py``)
all call :func:`run_group`; it lives apart from the runner so that the runner imports the
backends and the backends import this module, never the runner (no import circle).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from ..attacks.base import Reconstruction
from ..client import ClientSetup
from ..errors import AttackNotApplicable, GradleakError
from ..residual import Residual, reconstruction_residual, residual_summary
from ._batch import cell_model
from .cell import CellResult
from .cell import defense_label as _defense_label
from .cell import stored_record as _stored
from .config import AttackChoice, AuditConfig, ModelChoice, stable_hash

__all__ = ["CellSpec", "run_group", "levels"]


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


def levels(cell: CellResult, rule) -> dict[str, int]:
    ssim = cell.ssim if len(cell.ssim) == len(cell.psnr) else [None] * len(cell.psnr)
    found = [rule.level(p, s) for p, s in zip(cell.psnr, ssim)]
    return {level: found.count(level) for level in ("recognisable", "partial", "none")}


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
    from ..pipeline import attack_with_residuals

    result = _cell_result(spec, stack, config)
    start = time.perf_counter()
    try:
        attack, served = _served(spec, stack, config, context, spec.attack.name, spec.attack.options, served_cache)
        reconstruction, residuals = attack_with_residuals(attack, [d.update for d in served],
                                                          truths=[context["images"][d.indices] for d in served],
                                                          progress=progress)
        _finish_cell(result, spec, attack, served, reconstruction, residuals, config, context, out)
    except AttackNotApplicable as error:
        result.status, result.message, result.condition = "not-applicable", str(error), error.condition
    except GradleakError as error:
        result.status, result.message = "error", str(error)
    result.seconds = time.perf_counter() - start
    return result


def _finish_cell(result: CellResult, spec: CellSpec, attack, served: list, reconstruction: Reconstruction,
                 residuals: list[Residual], config: AuditConfig, context: dict[str, Any], out: Path) -> None:
    """Score ``reconstruction`` (of the updates ``served``; ``residuals``: each update's update
    residual, the truth-free measure) into ``result`` and write the cell's run folder."""
    from ..runs import write_run

    images, labels = context["images"], context["labels"]
    result.server, result.threat_model = attack.threat.server, attack.threat.sok(attack)["id"]
    result.privacy = next((d.privacy for d in served if d.privacy), {})
    if reconstruction.interrupted or reconstruction.updates < len(served):
        raise KeyboardInterrupt  # Ctrl-C inside the cell: never store (or write) it as finished
    order = [i for d in served[: reconstruction.updates] for i in d.indices]
    run = write_run(out / "cells" / result.cell_id, reconstruction, originals=images[order],
                    true_labels=labels[order], config={"cell": spec.key(config), "privacy": result.privacy,
                                                       "threat_model": attack.threat.sok(attack)},
                    residuals=residuals)
    result.summary = {k: v for k, v in run.scores.summary.items()}
    summary = residual_summary(residuals)
    result.summary.update(residual_median=summary["median"], certified=summary["certified"])
    result.residual = [r.value for r in residuals]
    result.certified = [r.certified for r in residuals]
    result.update_images = [len(d.indices) for d in served[: len(residuals)]]
    rows = {row["index"]: row for row in run.scores.per_image}  # missing: no reconstruction matched this image
    result.psnr = [rows[i]["psnr"] if i in rows else None for i in range(len(order))]
    result.ssim = [rows[i].get("ssim") if i in rows else None for i in range(len(order))]
    result.levels = levels(result, config.verdict)


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
            residuals = [reconstruction_residual(attack.model, d.update, part, attack.threat)
                         for d, part in zip(cell, mine)]
            _finish_cell(result, spec, attack, cell, Reconstruction.concat(mine), residuals, config, context, out)
        except GradleakError as error:
            result.status, result.message = "error", str(error)
        result.seconds = share + time.perf_counter() - began
        yield result
    if interrupted:
        raise KeyboardInterrupt
