"""Ctrl-C means stop: the whole command stops, what was done is written and said, exit 130;
an interrupted audit cell is never stored, and a resumed audit gives the uninterrupted numbers.

Ctrl-C is simulated by raising KeyboardInterrupt from inside the optimiser's step, which is
where a real SIGINT lands during an optimisation attack.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradleak import ThreatModel, build_model
from gradleak.attacks import get_attack
from gradleak.audit import run_audit
from gradleak.cli import app
from gradleak.pipeline import attack_simulated


class StepCounter:
    """Patch ``torch.optim.Adam.step`` to count calls and raise KeyboardInterrupt at call ``at``."""

    def __init__(self, monkeypatch, at: int | None):
        self.calls, self.at = 0, at
        original = torch.optim.Adam.step

        def step(optimizer, *args, **kwargs):
            self.calls += 1
            if self.at is not None and self.calls == self.at:
                raise KeyboardInterrupt
            return original(optimizer, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", step)


IG = ["-o", "iterations=20", "-o", "record_every=5"]


def test_ctrl_c_stops_the_whole_attack_command_writes_what_was_done_and_exits_130(tmp_path, monkeypatch):
    counter = StepCounter(monkeypatch, at=20 + 7)  # inside the second of three images, attacked one by one
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", "--attack", "inverting-gradients", "--model", "lenet", "--n", "3",
                                      "--out", str(out), "-q", *IG, "-o", "batched_targets=loop"])
    assert result.exit_code == 130, result.output
    assert "interrupted: wrote the 2 update(s) attacked so far" in result.output
    assert counter.calls == 27  # no iteration ran after Ctrl-C: the third image was never started
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_image"]) == 2
    assert any("interrupted: 2 of 3 updates attacked (the last one partly)" in note for note in metrics["notes"])
    assert any("interrupted at iteration 6 of 20" in note for note in metrics["notes"])
    assert (out / "report.html").is_file() and (out / "grid.png").is_file()


def test_ctrl_c_in_a_batched_chunk_keeps_every_image_of_the_chunk(tmp_path, monkeypatch):
    counter = StepCounter(monkeypatch, at=7)  # the three images are attacked together: one step for all
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", "--attack", "inverting-gradients", "--model", "lenet", "--n", "3",
                                      "--out", str(out), "-q", *IG])
    assert result.exit_code == 130, result.output
    assert "interrupted: wrote the 3 update(s) attacked so far" in result.output
    assert counter.calls == 7
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_image"]) == 3
    assert any("interrupted: 3 of 3 updates attacked (the last 3 partly, attacked together)" in note
               for note in metrics["notes"])
    assert sum("interrupted at iteration 6 of 20" in note for note in metrics["notes"]) == 3


def test_ctrl_c_runs_no_further_restart(photos, monkeypatch):
    model = build_model("lenet", (3, 32, 32), 10)
    from gradleak import fedsgd_update

    update = fedsgd_update(model, photos.images[:1], photos.labels[:1])
    attack = get_attack("inverting-gradients")(model, ThreatModel(), iterations=10, restarts=3,
                                               batched_restarts="loop")
    counter = StepCounter(monkeypatch, at=4)
    result = attack.reconstruct(update)
    assert result.interrupted and counter.calls == 4
    assert "interrupted: 1 of 3 restarts run" in result.notes
    assert torch.isfinite(result.images).all()


def test_an_uninterrupted_python_run_is_not_marked(tmp_path, monkeypatch):
    StepCounter(monkeypatch, at=None)
    from gradleak.pipeline import DataRequest

    run = attack_simulated("inverting-gradients", tmp_path / "r", model="lenet", data=DataRequest("photos", 2), quiet=True,
                           options={"iterations": 5})
    assert not run.reconstruction.interrupted and run.reconstruction.updates == 2


# 2 images x 8 restarts = 16 samples a cell: the cells of none and gaussian are attacked together (one vmap
# of 32 samples, audit/_batch.py), the pruning cell alone
AUDIT = """
name: interrupt audit
data: {name: photos, n: 2, size: 32}
models: [lenet]
attacks:
  - {name: inverting-gradients, options: {iterations: 15, record_every: 5, restarts: 8}}
defenses: [none, "gaussian:variance=1e-4", "pruning:ratio=0.5"]
utility: false
"""


def _numbers(result):
    return [(c.cell_id, c.status, c.psnr, c.ssim, c.summary.get("label_accuracy")) for c in result.cells]


@pytest.mark.parametrize("at, finished", [(4, 0), (15 + 4, 2)])
def test_a_resumed_audit_gives_the_numbers_of_an_uninterrupted_one(tmp_path, monkeypatch, at, finished):
    """Ctrl-C inside the two cells attacked together (nothing stored) or inside the third cell
    (the two stored): exit 130, nothing half-done left behind, and the resumed audit's numbers
    are those of an uninterrupted one."""
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    whole = run_audit(config, tmp_path / "whole", quiet=True)
    assert not whole.interrupted and len(whole.cells) == 3
    assert "one vmap over 4 targets x 8 restart(s)" in (tmp_path / "whole" / "cells" / whole.cells[1].cell_id /
                                                         "metrics.json").read_text()

    counter = StepCounter(monkeypatch, at=at)
    out = tmp_path / "cut"
    cut = CliRunner().invoke(app, ["audit", str(config), "--out", str(out), "-q", "--jobs", "1"])
    assert cut.exit_code == 130, cut.output
    assert f"interrupted: {finished} finished cell(s) are stored" in cut.output
    assert counter.calls == at
    stored = sorted(p.parent.name for p in out.glob("cells/*/cell.json"))
    assert stored == sorted(c.cell_id for c in whole.cells[:finished])
    # the interrupted cells left no run folder that could pass for a result
    assert not any((out / "cells" / c.cell_id / "metrics.json").exists() for c in whole.cells[finished:])
    report = json.loads((out / "audit.json").read_text())
    assert report["interrupted"] is True

    counter.at = None
    resumed = run_audit(config, out, quiet=True)
    assert not resumed.interrupted
    assert _numbers(resumed) == _numbers(whole)


@pytest.mark.parametrize("command", [["demo"], ["attack", "--model", "mlp", "--n", "2"]])
def test_ctrl_c_before_anything_finished_exits_130_and_writes_nothing(tmp_path, monkeypatch, command):
    from gradleak.attacks.analytic import FCBiasInversion

    def interrupt(self, update, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FCBiasInversion, "reconstruct", interrupt)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*command, "--out", str(out), "-q"])
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not (out / "report.html").exists() and not (out / "metrics.json").exists()


def test_ctrl_c_stops_the_architecture_study_and_keeps_the_models_run(tmp_path, monkeypatch):
    original = torch.optim.LBFGS.step
    calls = []

    def step(optimizer, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.LBFGS, "step", step)
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", "architectures", "--model", "lenet", "--model", "tv-resnet18",
                                      "--steps", "4", "--inner", "2", "--out", str(out), "-q"])
    assert result.exit_code == 130 and "interrupted: wrote the 1 model(s) run so far" in result.output
    table = json.loads((out / "table.json").read_text())
    assert [row["model"] for row in table] == ["lenet"] and table[0]["interrupted"] is True
    assert len(calls) == 2  # tv-resnet18 never ran
