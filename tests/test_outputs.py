"""Output paths: a place results cannot go is refused in one line before any work starts, and a
write that fails mid-way (disk full) is one line that leaves no partial or temporary file."""

from __future__ import annotations

import errno
import os

import pytest
from typer.testing import CliRunner

from gradleak.cli import app

AUDIT = """
name: outputs
data: {name: photos, n: 1, size: 16}
models: [{name: mlp, options: {hidden: "8"}}]
attacks: [fc-bias]
utility: false
"""


def _commands(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    return {
        "demo": lambda out: ["demo", "--n", "1", "--out", out],
        "attack": lambda out: ["attack", "--n", "1", "--out", out],
        "capture": lambda out: ["capture", "--out", out],
        "capture --truth": lambda out: ["capture", "--out", str(tmp_path / "ok.safetensors"), "--truth", out],
        "audit": lambda out: ["audit", str(config), "--out", out],
        "study": lambda out: ["study", "architectures", "--model", "lenet", "--steps", "1", "--out", out],
    }


def _bad_outputs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = {
        "empty": ("", "empty path"),
        "an existing file": (str(blocker), "a-file' is an existing"),
        "under a file": (str(blocker / "run"), "which is a file"),
        "under /proc": ("/proc/gradleak-test/run", "cannot write there"),
    }
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases["read-only"] = (str(locked / "run"), "cannot write there (Permission denied)")
    return cases


@pytest.mark.parametrize("command", ["demo", "attack", "capture", "capture --truth", "audit", "study"])
def test_unusable_outputs_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    build = _commands(tmp_path)[command]
    for case, (out, needle) in _bad_outputs(tmp_path).items():
        if command.startswith("capture") and case == "an existing file":
            continue  # an update or truth file may be overwritten (atomically)
        if command.startswith("capture") and case == "empty":
            needle = "an empty path is not a file name"
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = CliRunner().invoke(app, build(out) + ["-q"])
        assert result.exit_code == 2, (command, case, result.output)
        assert needle in result.output and result.output.count("\n") == 1, (command, case, result.output)
        assert "Traceback" not in result.output
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, (command, case)  # nothing written


def test_a_full_disk_mid_run_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import gradleak._io as io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", "--n", "1", "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert "cannot write" in result.output and "No space left on device" in result.output
    assert result.output.count("\n") == 1
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.json"))


def test_an_existing_run_folder_is_written_into(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    result = CliRunner().invoke(app, ["attack", "--n", "1", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("args, needle", [
    (["attack", "--n", "abc"], "Invalid value for '--n'"),
    (["attakk"], "No such command 'attakk'"),
    (["attack", "--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line(args, needle):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and needle in result.output and "error:" in result.output
    assert result.output.count("\n") == 1 and "--help" in result.output
