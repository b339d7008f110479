"""Audit cells as Ray tasks: ``run_audit(config, out, ray="auto" | ADDRESS, workers=N)``,
``gradleak audit CONFIG --ray`` / ``--ray-address ADDRESS``.

One task per group of cells (``audit/_batch.py``: cells that share their client updates,
or cells of one attack under several defense entries, attacked together): it runs the
group with :func:`~gradleak.audit.runner.run_group`, the code
of a local audit, yielding each cell as its run folder is written (a Ray streaming
generator). The driver writes each ``cell.json`` (atomically) as it arrives, so an
interrupted run keeps every finished cell, and a cell is stored exactly as a local run
stores it: the task gets the driver's config, images (sent as tensors), seeds and dtype,
and runs with one torch thread, so its numbers equal those of ``gradleak audit --threads 1``
bit for bit (with more threads a local run may differ in the last bits). Local and Ray runs
therefore resume each other's cells.

Where the tasks run:

- ``"auto"`` (CLI ``--ray``): a local Ray of ``workers`` CPUs (default: all), one task per
  CPU, started only when a cell is left to compute, without dashboard or worker logs, and
  shut down at the end with its processes, Ctrl-C and errors included. A Ray this process
  already runs (``ray.is_initialized()``) is used as it is and left running.
- ``HOST:PORT`` (CLI ``--ray-address``): the head of a running cluster (``ray start --head``
  prints it). The audit connects, keeps at most ``workers`` tasks in flight (default: the
  cluster's CPUs), and disconnects at the end; it never stops the cluster. Ray Client
  addresses (``ray://``) are refused. Tasks write the cells' run folders where the driver
  reads them, so every node must see the same paths as the driver: the audit folder (the
  driver checks, and stops with one line if a cell's folder is missing), data set paths,
  weights files, and the module of a ``package.module:factory`` model (the driver's
  ``sys.path`` is appended to the task's; elsewhere install the module on every node or
  start the cluster with a ``runtime_env``). A CUDA device needs GPUs in the cluster: each
  task then takes a share of them.

Ray is an optional dependency: ``pip install 'gradleak[flower]'`` installs ``ray==2.55.1``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, one_line
from ._checks import show

__all__ = ["RayBackend"]

log = logging.getLogger(__name__)

MAX_WORKERS = 4096


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("ray: Ray is not installed; pip install 'gradleak[flower]' (ray==2.55.1)") from None
    return ray


def _check_address(address: str) -> None:
    """``HOST:PORT`` that something answers at, in at most 5 s (Ray itself waits for minutes)."""
    if address.startswith("ray://"):
        raise ConfigError(f"ray address {address!r}: Ray Client (ray://) is not supported; run the audit on a "
                          "node of the cluster and give the head's HOST:PORT (`ray status` shows it)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"ray address: expected HOST:PORT of a Ray cluster's head, got {show(address)}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as connection:
            answer = _http2_answer(connection)
    except OSError as error:
        raise ConfigError(f"ray address {address!r}: no Ray cluster answers there ({one_line(error, 120)}); "
                          "start one with `ray start --head`, or use --ray for a local Ray") from None
    if answer is not True:
        raise ConfigError(f"ray address {address!r}: something answers there, but not a Ray head (its GCS speaks "
                          f"gRPC; this server {answer}); `ray status` on the cluster shows the head's HOST:PORT")


# An HTTP/2 client's connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _http2_answer(connection: socket.socket) -> bool | str:
    """True when the server answers an HTTP/2 preface with a SETTINGS frame, as every gRPC
    server (Ray's GCS among them) does at once; else what it did instead, in words. Ray's own
    client would retry a non-Ray server for 20 s or more, printing warnings."""
    connection.settimeout(3)
    try:
        connection.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = connection.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except socket.timeout:
        return "sent nothing back within 3 s"
    except OSError as error:
        return f"closed the connection ({one_line(error, 80)})"
    if len(head) == 9 and head[3] == 0x04:  # a frame of type SETTINGS
        return True
    if not head:
        return "closed the connection without a word"
    if head.startswith(b"HTTP/"):
        return "answered in HTTP/1"
    return f"answered {len(head)} bytes that are not an HTTP/2 SETTINGS frame"


class RayBackend:
    """Runs groups of audit cells as Ray tasks; see the module's notes."""

    def __init__(self, ray: str | bool, workers: int | None = None):
        if ray is True or ray == "auto":
            self.address = None
        elif isinstance(ray, str) and ray.strip() and len(ray) <= 300 and ray.isprintable():
            self.address = ray.strip()
        else:
            raise ConfigError(f"ray: expected 'auto' or the HOST:PORT of a Ray cluster, got {show(ray)}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or not 0 < workers <= MAX_WORKERS):
            raise ConfigError(f"workers: must be an integer from 1 to {MAX_WORKERS}, got {show(workers)}")
        self.workers = workers
        self._ray = _import_ray()
        if self.address is not None and not self._ray.is_initialized():
            _check_address(self.address)

    @contextmanager
    def session(self) -> Iterator[int]:
        """Ray initialised for this audit; yields how many tasks to keep in flight."""
        ray = self._ray
        if ray.is_initialized():  # someone else's Ray: used as it is, never shut down here
            yield self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            return
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's note on accelerator variables
            if self.address is None:
                ray.init(address="local", num_cpus=self.workers or os.cpu_count() or 1, **quiet)
            else:
                try:
                    ray.init(address=self.address, **quiet)
                except (ConnectionError, ValueError, RuntimeError) as error:
                    raise ConfigError(f"ray address {self.address!r}: {one_line(error, 200)}") from None
        try:
            yield self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        finally:
            ray.shutdown()  # a local Ray: its processes stop; a cluster: this driver disconnects, the cluster runs on

    def run(self, config, specs: list, groups: list[list[int]], stacks: list[list[Any]], context: dict[str, Any],
            out: Path, store: Callable[[int, Any], None], progress) -> None:
        """Compute ``groups`` (lists of indices into ``specs``), calling ``store(index, cell)`` in
        this process as each cell arrives. Ctrl-C or an error cancels the tasks in flight."""
        ray = self._ray
        with self.session() as inflight:
            device = context["device"]
            gpus = 0.0
            if device.type == "cuda":
                total = ray.cluster_resources().get("GPU", 0)
                if not total:
                    raise ConfigError(f"device {device}: the Ray cluster has no GPU; use --device cpu")
                gpus = min(1.0, total / inflight)
            task = ray.remote(_cell_task).options(num_cpus=1, num_gpus=gpus, max_retries=0)
            shared = ray.put({**context, "images": context["images"].cpu(), "labels": context["labels"].cpu(),
                              "device": "cuda" if device.type == "cuda" else str(device)})
            bar = progress.add_task(f"  ray: {len(groups)} task(s), {inflight} at a time", total=len(groups))

            def submit(group: list[int]):
                members = [specs[i] for i in group]
                return task.remote(config, members, [stacks[m.defense_index] for m in members], shared, str(out),
                                   list(sys.path))

            def arrived(index: int, cell) -> None:
                folder = out / "cells" / cell.cell_id
                if cell.status == "done" and not (folder / "metrics.json").is_file():
                    raise ConfigError(f"cell {cell.cell_id}: its Ray task wrote {folder} where this machine does not "
                                      "see it; the audit folder must be on a filesystem every node shares")
                store(index, cell)

            _drive(ray, groups, submit, inflight, arrived, lambda: progress.advance(bar))
            progress.remove_task(bar)


def _drive(ray, groups: list[list[int]], submit, inflight: int, arrived, finished) -> None:
    """Keep ``inflight`` groups running; hand each cell to ``arrived`` as its task yields it."""
    waiting = list(groups)
    running: dict[Any, list] = {}  # streaming generator -> [its group, cells received]
    try:
        while waiting or running:
            while waiting and len(running) < inflight:
                group = waiting.pop(0)
                running[submit(group)] = [group, 0]
            ready, _ = ray.wait(list(running), num_returns=1)
            generator = ready[0]
            group, received = running[generator]
            try:
                cell = ray.get(next(generator))
            except StopIteration:
                del running[generator]
                finished()
                continue
            running[generator][1] += 1
            arrived(group[received], cell)
    except BaseException:
        for generator in running:  # Ctrl-C or an error: nothing more is computed for this audit
            try:
                ray.cancel(generator, force=True)
            except Exception as error:  # already finished, or the connection is gone
                log.debug("could not cancel a Ray task: %s", error)
        raise


def _cell_task(config, specs: list, stacks: list[list[Any]], context: dict[str, Any], out: str, sys_path: list[str]):
    """The Ray task: one group of cells, computed as a local audit computes them."""
    import torch

    from ._group import run_group

    torch.set_num_threads(1)
    sys.path.extend(p for p in sys_path if p not in sys.path)  # a factory model's module, on the same machine
    device = torch.device(context["device"])
    context = {**context, "device": device, "images": context["images"].to(device),
               "labels": context["labels"].to(device)}
    yield from run_group(config, specs, stacks, context, Path(out))
