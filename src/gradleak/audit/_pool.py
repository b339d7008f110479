"""Audit cells and utility trainings in local worker processes: ``run_audit(..., jobs=N)``,
``gradleak audit CONFIG --jobs N`` (the CLI's default, ``auto``, is one job per CPU).

Each worker is a spawned Python process with one torch thread that computes whole groups of
cells (``audit/_batch.py``: cells sharing their client updates, or attacked together)
with :func:`~gradleak.audit.runner.run_group`, the code of an in-process audit, and the
utility trainings with the same function an in-process audit calls; each result goes back to
this process through a queue as it is finished, and is stored here (atomically) at once.
A worker's numbers equal an in-process audit run with ``--threads 1`` bit for bit, so runs
with any number of jobs (or on Ray) resume each other's cells.

Ctrl-C: workers ignore SIGINT; this process stores what has arrived, stops the workers
(what they were computing is dropped, never stored half-done) and the audit reports the
interruption as an in-process one does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue as queues
import signal
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ._checks import show

__all__ = ["ProcessPool", "resolve_jobs", "MAX_JOBS"]

log = logging.getLogger(__name__)

MAX_JOBS = 1024


def resolve_jobs(jobs: int | str | None) -> int:
    """``jobs`` as a number of processes: None -> 1 (in this process), ``"auto"`` -> the CPUs
    this process may use; a ConfigError naming the value otherwise."""
    if jobs is None:
        return 1
    if jobs == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(jobs, str) and jobs.isdigit():
        jobs = int(jobs)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 0 < jobs <= MAX_JOBS:
        raise ConfigError(f"jobs: expected 'auto' or an integer from 1 to {MAX_JOBS}, got {show(jobs)}")
    return jobs


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_start() -> None:
    import torch

    _ignore_sigint()
    torch.set_num_threads(1)


def _cells_task(config, specs: list, stacks: list, context: dict[str, Any], out: str, positions: list[int], results):
    """One group of cells, computed as an in-process audit computes them; each cell is sent on arrival."""
    from ._group import run_group

    device = context["device"]
    context = {**context, "images": context["images"].to(device), "labels": context["labels"].to(device)}
    for position, cell in zip(positions, run_group(config, specs, stacks, context, Path(out))):
        results.put(("cell", position, cell))


def _utility_task(stack: list, config, out: str, resume: bool, index: int, results) -> None:
    from ..pipeline import progress_bar
    from .utility import run_utility

    results.put(("utility", index, run_utility(stack, config, Path(out), progress_bar(True), resume)))


class ProcessPool:
    """Runs groups of audit cells, then utility trainings, in ``jobs`` local processes."""

    def __init__(self, jobs: int):
        self.jobs = resolve_jobs(jobs)

    def run(self, config, specs: list, groups: list[list[int]], stacks: list[list[Any]], context: dict[str, Any],
            out: Path, store: Callable[[int, Any], None], progress,
            utility: list[int] = (), utility_done: Callable[[int, dict], None] | None = None,
            resume: bool = True) -> None:
        """Compute ``groups`` (lists of indices into ``specs``) and the utility trainings of the
        defense entries ``utility``, calling ``store(index, cell)`` and ``utility_done(index,
        result)`` in this process as each arrives. Ctrl-C or an error stops the workers."""
        context = {**context, "images": context["images"].cpu(), "labels": context["labels"].cpu()}
        spawn = multiprocessing.get_context("spawn")
        manager = SyncManager(ctx=spawn)
        manager.start(_ignore_sigint)
        pool = spawn.Pool(self.jobs, initializer=_worker_start)
        bar = progress.add_task(f"  groups of cells and trainings done by {self.jobs} worker processes (a group's "
                                f"cells arrive together)", total=len(groups) + len(utility))
        try:
            results = manager.Queue()
            pending = [pool.apply_async(_cells_task, (config, [specs[i] for i in group],
                                                      [stacks[specs[i].defense_index] for i in group], context,
                                                      str(out), group, results)) for group in groups]
            pending += [pool.apply_async(_utility_task, (stacks[i], config, str(out), resume, i, results))
                        for i in utility]
            pool.close()
            _collect(results, pending, store, utility_done, lambda: progress.advance(bar))
        finally:
            pool.terminate()  # after an error or Ctrl-C: nothing more is computed for this audit
            pool.join()
            manager.shutdown()
            progress.remove_task(bar)


def _collect(results, pending: list, store, utility_done, finished) -> None:
    """Hand each result to its callback as it arrives, until every task is done; a task's
    exception is raised here."""
    done = 0
    while True:
        try:
            kind, index, value = results.get(timeout=0.2)
        except queues.Empty:
            for task in pending:
                if task.ready() and not task.successful():
                    task.get()  # raises the worker's exception
            now = sum(task.ready() for task in pending)
            for _ in range(now - done):
                finished()
            done = now
            if done == len(pending) and results.empty():
                return
            continue
        if kind == "cell":
            store(index, value)
        elif utility_done is not None:
            utility_done(index, value)
