"""What a user reads after a run: the defense named where they look, the configuration without
duplicates, each note once, and short reprs (issue 24)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from gradleak.attacks.base import Reconstruction
from gradleak.cli import app
from gradleak.data.request import DataRequest
from gradleak.pipeline import attack_simulated


def test_the_defense_is_in_the_title_the_summary_line_and_the_page(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["attack", "--n", "2", "--size", "16", "--defense", "pruning:ratio=0.3",
                                      "--defense", "half", "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert "defense: pruning(ratio=0.3) + half(dtype=float16)" in last
    page = (out / "report.html").read_text()
    title = page[page.index("<h1>"):page.index("</h1>")]
    assert "under pruning(ratio=0.3) + half(dtype=float16)" in title
    plain = CliRunner().invoke(app, ["attack", "--n", "2", "--size", "16", "--out", str(tmp_path / "plain")])
    assert "defense:" not in plain.stdout and ", no defense" in (tmp_path / "plain" / "report.html").read_text()


def test_the_page_says_each_thing_once(tmp_path):
    run = attack_simulated("fc-bias", tmp_path / "run", data=DataRequest("photos", 3, 16), model="mlp", quiet=True)
    page = run.report.read_text()
    config = page[page.index("<h2>Run configuration</h2>"):]
    assert "<code>model_spec.name</code>" in config and "<code>model.name</code>" not in config
    assert "<code>model.kwargs" not in config
    assert config.count("<code>mode</code>") == 0 and "model_spec.mode" in config       # said once, in the spec
    notes = page[page.index("<h2>Notes</h2>"):page.index("<h2>Run configuration</h2>")]
    assert len(run.reconstruction.notes) == 9                               # three notes from each of 3 updates
    idlg = "label from the sign of the classifier gradient (iDLG), layer &#x27;layers.fc3&#x27;"
    assert notes.count(idlg) == 1 and f"every update (3): {idlg}" in notes   # said alike: once
    assert notes.count("<li>") == 7                                         # the residuals differ: kept apart
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Reconstructions</h2>")]
    assert "ssim_std" not in summary and "psnr_std" not in summary and "n_exact" not in summary


def test_reprs_show_shapes_and_figures_not_tensors(tmp_path):
    run = attack_simulated("fc-bias", tmp_path / "run", data=DataRequest("photos", 2, 16), model="mlp", quiet=True)
    text = repr(run)
    assert text.startswith("RunResult(run_dir=") and "all 2 images recovered" in text and "PSNR" in text
    assert "tensor(" not in text and len(text) < 400
    rec = Reconstruction(torch.rand(64, 3, 32, 32), torch.arange(64), attack="x", notes=["a"] * 100)
    assert repr(rec) == ("Reconstruction(attack='x', images=(64, 3, 32, 32), labels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "
                         "11, 12, 13, 14, 15], updates=1, notes=100)")
    json.dumps(run.scores.summary)  # still plain data underneath
