"""Audits on Ray: the same cells with the same numbers as a local run, resuming across local
and Ray runs in both directions, Ray started only on demand and never twice, its processes
gone afterwards, a cluster we did not start left running, bad addresses as one line.

Real images (the built-in photos); every Ray here is local, on this machine's CPUs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradleak.audit import audit_cells, run_audit
from gradleak.audit import _group as audit_group
from gradleak.audit import runner as audit_runner
from gradleak.cli import app
from gradleak.errors import ConfigError

ray = pytest.importorskip("ray")

# 2 attacks x 2 defenses = 4 cells in 2 groups (one per defense) of 2 cells each (batched_targets=loop:
# the IG cells are not attacked together across defenses, audit/_batch.py; tests/test_throughput.py does that)
AUDIT = """
name: ray audit
data: {name: photos, n: 2, size: 16}
models: [lenet]
attacks:
  - {name: inverting-gradients, options: {iterations: 12, record_every: 4, batched_targets: loop}}
  - {name: dlg, options: {iterations: 4}}
defenses: [none, "gaussian:variance=1e-4"]
utility: false
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "audit.yaml"
    path.write_text(AUDIT)
    return path


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """The stored cells of one uninterrupted local run (torch at one thread, as conftest sets)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference") / "out"
        result = run_audit(config_file, out, quiet=True)
    finally:
        torch.set_num_threads(previous)
    assert not result.interrupted and [c.status for c in result.cells] == ["done"] * 4
    return _stored(out)


def _stored(out: Path) -> dict[str, dict]:
    """Every stored cell.json of an audit folder: its key and result, timing left out."""
    cells = {}
    for path in sorted(out.glob("cells/*/cell.json")):
        record = json.loads(path.read_text())
        record["result"].pop("seconds")
        cells[path.parent.name] = record
    return cells


def _ray_processes() -> set[int]:
    """Ray processes this test process started: raylet and gcs_server name their session
    folder, whose name ends in the pid of the driver that started them; the rest (workers,
    dashboard, monitors) are its children or the raylet's."""
    me = os.getpid()
    found, parents = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (b"raylet" in cmdline or b"gcs_server" in cmdline) and f"_{me}/".encode() in cmdline:
            found.add(int(entry.name))
        elif parents[int(entry.name)] == me and b"ray" in cmdline:
            found.add(int(entry.name))
    return found | {pid for pid, parent in parents.items() if parent in found}


def _gone(pids_of, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while pids_of() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not pids_of()


def test_a_ray_run_stores_the_cells_of_a_local_run_and_leaves_no_process(tmp_path, config_file, reference):
    assert not ray.is_initialized() and not _ray_processes()
    result = run_audit(config_file, tmp_path / "ray", quiet=True, ray="auto", workers=2)
    assert not result.interrupted and len(result.cells) == 4
    assert _stored(tmp_path / "ray") == reference  # every psnr, ssim, summary, level, key: bit for bit
    assert [c.cell_id for c in result.cells] == [s.cell_id(result.config) for s in audit_cells(result.config)]
    assert (tmp_path / "ray" / "report.html").is_file()
    for cell in result.cells:  # the tasks wrote the run folders
        assert (tmp_path / "ray" / "cells" / cell.cell_id / "grid.png").is_file()
    assert not ray.is_initialized(), "the audit started Ray: it shuts it down"
    assert _gone(_ray_processes), f"Ray processes left behind: {_ray_processes()}"


def test_resume_across_local_and_ray_runs_in_both_directions(tmp_path, config_file, reference, monkeypatch):
    """local (Ctrl-C after 1 cell) -> Ray (Ctrl-C after 1 more) -> local: each run computes only
    the cells not stored, the stored files stay untouched, and the numbers are the reference's.
    The Ray here is the test's own: the audit uses it, never starts a second one, and leaves it up."""
    out = tmp_path / "out"
    original = audit_group._run_cell
    computed = []

    def interrupt_second(spec, *args, **kwargs):
        if len(computed) == 1:
            raise KeyboardInterrupt
        computed.append(spec.cell_id(args[1]))
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(audit_group, "_run_cell", interrupt_second)
    first = run_audit(config_file, out, quiet=True)
    assert first.interrupted and len(first.cells) == 1 and len(_stored(out)) == 1
    monkeypatch.setattr(audit_group, "_run_cell", original)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("cells/*/*.json")}

    groups, writes, inits = [], [], []
    real_groups, real_write = audit_runner.plan_groups, audit_runner.atomic_write_json
    monkeypatch.setattr(audit_runner, "plan_groups", lambda config, specs, stacks, todo, context:
                        groups.append(list(todo)) or real_groups(config, specs, stacks, todo, context))

    def interrupt_second_store(path, value):  # Ctrl-C in the driver as the Ray run's 2nd cell arrives
        if Path(path).name == "cell.json":
            writes.append(path)
            if len(writes) == 2:
                raise KeyboardInterrupt
        return real_write(path, value)

    monkeypatch.setattr(audit_runner, "atomic_write_json", interrupt_second_store)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _ray_processes(), "the process check sees a running Ray"
        monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(1))
        second = run_audit(config_file, out, quiet=True, ray="auto")
        assert inits == [] and ray.is_initialized(), "an initialised Ray is used, not started again nor stopped"
    finally:
        monkeypatch.undo()
        ray.shutdown()
    assert _gone(_ray_processes)
    assert groups == [[1, 2, 3]], "the locally stored cell (grid position 0) is not sent to Ray"
    assert second.interrupted and len(second.cells) == 2 and len(_stored(out)) == 2
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == seen for p, seen in before.items())

    monkeypatch.setattr(audit_group, "_run_cell", lambda spec, *a, **k: computed.append(spec.cell_id(a[1])) or
                        original(spec, *a, **k))
    third = run_audit(config_file, out, quiet=True)
    assert not third.interrupted and len(third.cells) == 4
    assert len(computed) == 3 and len(set(computed)) == 3, "the final local run computes only the 2 cells left"
    assert _stored(out) == reference


def test_ray_is_started_only_when_a_cell_is_left(tmp_path, config_file, reference, monkeypatch):
    out = tmp_path / "out"
    run_audit(config_file, out, quiet=True)
    inits = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(1))
    again = run_audit(config_file, out, quiet=True, ray="auto")
    assert inits == [] and len(again.cells) == 4 and _stored(out) == reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, needle", [
    (f"127.0.0.1:{_free_port()}", "no Ray cluster answers there"),
    ("not an address", "expected HOST:PORT"),
    ("ray://127.0.0.1:10001", "Ray Client (ray://) is not supported"),
    ("", "expected 'auto' or the HOST:PORT"),
])
def test_a_bad_ray_address_is_one_config_error_line_and_writes_nothing(tmp_path, config_file, address, needle):
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        run_audit(config_file, tmp_path / "out", quiet=True, ray=address)
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists() and not ray.is_initialized()


def test_cli_ray_options_are_checked_before_anything_runs(tmp_path, config_file):
    runner = CliRunner()
    bad = runner.invoke(app, ["audit", str(config_file), "--out", str(tmp_path / "a"),
                              "--ray-address", f"127.0.0.1:{_free_port()}"])
    assert bad.exit_code == 2 and "no Ray cluster answers there" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1, bad.output
    alone = runner.invoke(app, ["audit", str(config_file), "--out", str(tmp_path / "b"), "--workers", "2"])
    assert alone.exit_code == 2 and "--workers: only with --ray or --ray-address" in alone.output
    with pytest.raises(ConfigError, match="workers: must be an integer"):
        run_audit(config_file, tmp_path / "c", ray="auto", workers=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- slower: the command, a cluster
# 5 groups of 2 cells on 2 Ray workers: the first cell is stored with most of the audit still to run
# (with 3 groups, one CI run saw the whole audit finish before the SIGINT arrived: exit 0)
SLOW = AUDIT.replace("iterations: 12, record_every: 4", "iterations: 300, record_every: 100").replace(
    'defenses: [none, "gaussian:variance=1e-4"]',
    'defenses: [none, "gaussian:variance=1e-4", "pruning:ratio=0.3", "pruning:ratio=0.6", half]')


@pytest.mark.slow
def test_ctrl_c_on_the_ray_command_keeps_finished_cells_exits_130_and_stops_ray(tmp_path):
    """A real SIGINT to the whole process group (what a terminal's Ctrl-C sends) once the first
    cell is stored: exit 130, only whole cells stored, no Ray process left; a local run
    completes the audit with the numbers of an uninterrupted one."""
    config = tmp_path / "audit.yaml"
    config.write_text(SLOW)
    out = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("gradleak")), "audit", str(config), "--out", str(out), "--ray",
               "--workers", "2", "-q"]
    # SIGINT as a terminal delivers it: never inherited as ignored (an ignored SIGINT stays ignored across exec)
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    session = f"_{process.pid}/".encode()
    began = time.monotonic()

    def ours() -> set[int]:  # the command's Ray: its session folder names the command's pid
        pids = set()
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and session in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
        return pids

    deadline = time.monotonic() + 240
    while not any(out.glob("cells/*/cell.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ours(), "the command runs a local Ray"
    seen = (len(list(out.glob("cells/*/cell.json"))), round(time.monotonic() - began, 1), process.poll(),
            signal.getsignal(signal.SIGINT))
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, f"{output!r}; cells stored, seconds, exit code, SIGINT here at the kill: {seen}"
    stored = _stored(out)
    assert 1 <= len(stored) < 10 and "finished cell(s) are stored" in output
    assert _gone(ours), f"Ray processes left behind: {ours()}"
    for name in stored:
        assert (out / "cells" / name / "metrics.json").is_file()

    whole = run_audit(config, tmp_path / "whole", quiet=True)
    resumed = run_audit(config, out, quiet=True)
    assert not resumed.interrupted and _stored(out) == _stored(tmp_path / "whole")
    assert all(stored[name] == _stored(out)[name] for name in stored)
    assert len(whole.cells) == 10


CLUSTER = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""

FACTORY = '''
import torch.nn as nn

def tiny_cnn(width=4, classes=10):
    return nn.Sequential(nn.Conv2d(3, int(width), 5, padding=2, stride=2), nn.Sigmoid(), nn.Flatten(),
                         nn.Linear(int(width) * 8 * 8, int(classes)))
'''


@pytest.mark.slow
def test_an_existing_cluster_runs_the_cells_of_a_factory_model_and_keeps_running(tmp_path, monkeypatch):
    """A Ray cluster another process started: the audit connects by address, its tasks import
    the config's own model factory, the numbers equal a local run's, and the cluster is not
    stopped (it ends only when its owner ends)."""
    from gradleak.audit import load_audit_config

    (tmp_path / "ray_audit_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT.replace("models: [lenet]", "models: [{name: 'ray_audit_nets:tiny_cnn', "
                                                       "options: {width: 4}}]"))
    loaded = load_audit_config(config, allow_imports=("ray_audit_nets",))
    local = run_audit(loaded, tmp_path / "local", quiet=True)
    assert [c.status for c in local.cells] == ["done"] * 4

    owner = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    session = f"_{owner.pid}/".encode()

    def cluster() -> set[int]:
        return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _reads(e, session)}

    try:
        address = owner.stdout.readline().strip()
        assert address and cluster(), "the cluster runs"
        result = run_audit(loaded, tmp_path / "ray", quiet=True, ray=address, workers=2)
        assert not ray.is_initialized(), "the audit disconnected"
        assert cluster() and owner.poll() is None, "the cluster it did not start keeps running"
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
    assert not result.interrupted and _stored(tmp_path / "ray") == _stored(tmp_path / "local")
    assert _gone(cluster), "the cluster's owner stopped it"


def _reads(entry: Path, needle: bytes) -> bool:
    try:
        return needle in (entry / "cmdline").read_bytes()
    except OSError:
        return False
