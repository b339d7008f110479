"""The audit: config parsing with named errors, a real grid end to end, resuming, interruption."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from gradleak.audit import AuditConfig, audit_cells, load_audit_config, run_audit
from gradleak.audit import _group as audit_group
from gradleak.cli import app
from gradleak.errors import ConfigError

YAML = """
name: tiny audit
data: {name: photos, n: 2, size: 16}
models:
  - {name: mlp, options: {hidden: "64"}}
attacks: [fc-bias]
defenses:
  - none
  - gaussian:variance=1e-4
  - {name: secure-aggregation, clients: 2}
  - [clipping:max_norm=0.1, half]
batch_sizes: [1]
utility: {data: digits, model: mlp, clients: 3, rounds: 3, eval_every: 1}
"""

TOML = """
name = "tiny audit"
attacks = ["fc-bias"]
defenses = ["none", "gaussian:variance=1e-4", {name = "secure-aggregation", clients = 2}, ["clipping:max_norm=0.1", "half"]]
batch_sizes = [1]
[data]
name = "photos"
n = 2
size = 16
[[models]]
name = "mlp"
options = {hidden = "64"}
[utility]
data = "digits"
model = "mlp"
clients = 3
rounds = 3
eval_every = 1
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text(YAML)
    return path


def test_yaml_and_toml_configs_are_the_same_audit(tmp_path, config_file):
    toml = tmp_path / "audit.toml"
    toml.write_text(TOML)
    a, b = load_audit_config(config_file), load_audit_config(toml)
    assert a.to_json() == b.to_json()
    assert [len(d) for d in a.defenses] == [1, 1, 1, 2]


@pytest.mark.parametrize("change, needle", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"attacks": ["fc-bais"]}, "attacks\\[0\\]: unknown attack 'fc-bais'"),
    ({"models": ["lenett"]}, "models\\[0\\]: unknown model 'lenett'"),
    ({"defenses": ["none", "gausian"]}, "defenses\\[1\\]: unknown defense 'gausian'"),
    ({"defenses": ["pruning:ratio=2"]}, "defenses\\[0\\]: pruning: ratio must be in"),
    ({"defenses": ["secure-aggregation:clients=4"]}, "data.n=2 images do not split"),
    ({"batch_sizes": [0]}, "batch_sizes\\[0\\]: must be a positive integer"),
    ({"utility": {"rounds": 3, "colour": 1}}, "utility: unknown key 'colour'"),
    ({"client": {"protocol": "fedsgdd"}}, "protocol must be"),
    ({"models": []}, "models: expected a non-empty list"),
    ({"attacks": [{"name": "fc-bias", "models": ["lenet"]}]}, "attacks\\[0\\].models: 'lenet' is not one of"),
    ({"verdict": {"recognisable_ssim": 1.5}}, "verdict: recognisable_ssim must be in \\(0, 1\\]"),
    ({"verdict": {"recognisable_ssim": 0.3, "partial_ssim": 0.5}}, "partial_ssim \\(0.5\\) must not exceed"),
    ({"verdict": {"partial_psnr": 20}}, "partial_psnr \\(20\\) must not exceed recognisable_psnr"),
])
def test_bad_configs_are_refused_naming_the_key(change, needle):
    import yaml

    raw = yaml.safe_load(YAML) | change
    with pytest.raises(ConfigError, match=needle):
        AuditConfig.from_mapping(raw)


def test_verdict_rule_takes_the_higher_of_psnr_and_ssim():
    """DLG through variance-1e-4 noise, the astronaut: 12.4 dB, SSIM 0.52, recognisable by eye."""
    from gradleak.audit.config import VerdictRule

    assert VerdictRule().level(12.4, 0.52) == "none"        # PSNR alone: default, SSIM ignored
    by_ssim = VerdictRule(recognisable_ssim=0.5, partial_ssim=0.3)
    assert by_ssim.level(12.4, 0.52) == "recognisable" and by_ssim.level(12.4, 0.35) == "partial"
    assert by_ssim.level(19.0, 0.1) == "recognisable" and by_ssim.level(None, None) == "none"
    assert by_ssim.level(float("nan"), 0.2) == "none"
    assert by_ssim.describe("partial") == "PSNR >= 14 dB or SSIM >= 0.3"


def test_unparseable_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [lenet\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_audit_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_audit_config(tmp_path / "missing.toml")
    (tmp_path / "audit.json").write_text("{}")
    with pytest.raises(ConfigError, match="expected a .yaml"):
        load_audit_config(tmp_path / "audit.json")


def test_audit_runs_the_grid_and_writes_one_report(tmp_path, config_file):
    result = run_audit(config_file, tmp_path / "out", quiet=True)
    by_defense = {c.defense: c for c in result.cells}
    assert set(by_defense) == {"none", "gaussian(variance=0.0001)", "secure-aggregation(clients=2)",
                               "clipping(max_norm=0.1) + half(dtype=float16)"}
    assert by_defense["none"].status == "done" and min(by_defense["none"].psnr) >= 60
    assert by_defense["none"].levels == {"recognisable": 2, "partial": 0, "none": 0}
    # noise breaks exactness, not the attack: the robust estimate is measured (what the defense leaves)
    noisy = by_defense["gaussian(variance=0.0001)"]
    assert noisy.status == "done" and max(noisy.psnr) < 60
    stored = json.loads((tmp_path / "out" / "cells" / noisy.cell_id / "metrics.json").read_text())
    assert any("APPROXIMATE" in note for note in stored["notes"])
    assert by_defense["secure-aggregation(clients=2)"].status == "not-applicable"
    verdicts = {v["defense"]: v for v in result.verdicts}
    assert verdicts["none"]["level"] == "leaks" and "still recovers recognisable images" in verdicts["none"]["text"]
    assert verdicts["gaussian(variance=0.0001)"]["level"] in ("leaks", "partial", "protected")
    assert set(result.utility) == {0, 1, 2, 3}
    accuracies = [result.utility[k]["accuracy"] for k in range(4)]
    assert all(0.1 < a <= 1.0 for a in accuracies)
    out = tmp_path / "out"
    for name in ("report.html", "audit.json", "cells.csv", "privacy_utility.png", "psnr_by_defense.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "Verdicts" in html and "Privacy and utility" in html and "data:image/png;base64," in html
    assert f"cells/{by_defense['none'].cell_id}/report.html" in html
    glance = html[html.index("At a glance"):html.index('<ul class="notes">')]
    rows = re.findall(r"<tr><td class=\"num\">(\d)</td><td>([^<]*)</td><td>(.*?)</td></tr>", glance)
    assert [(i, d) for i, d, _ in rows] == [("0", "none"), ("1", "gaussian(variance=0.0001)"),
                                           ("2", "secure-aggregation(clients=2)"),
                                           ("3", "clipping(max_norm=0.1) + half(dtype=float16)")]
    assert ">leaks</span> (2/2)" in rows[0][2] and ">not-measured</span>" not in rows[1][2]  # measured, not refused
    stored = json.loads((out / "audit.json").read_text())
    assert len(stored["cells"]) == 4 and stored["interrupted"] is False
    assert len((out / "cells.csv").read_text().strip().splitlines()) == 5
    # one attack per (model, defense): the plot's colour (cell_level) is the matrix's verdict, cell by cell
    from gradleak.audit.verdict import cell_level

    for cell in result.cells:
        assert cell_level(cell) == verdicts[cell.defense]["level"], cell.defense


def test_audit_resumes_without_recomputing_and_recomputes_what_changed(tmp_path, config_file, monkeypatch):
    out = tmp_path / "out"
    first = run_audit(config_file, out, quiet=True)
    calls = []
    original = audit_group._run_cell

    def counting(spec, *args, **kwargs):
        calls.append(spec.defense_index)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(audit_group, "_run_cell", counting)
    again = run_audit(config_file, out, quiet=True)
    assert calls == [] and [c.to_json() for c in again.cells] == [c.to_json() for c in first.cells]
    (out / "cells" / first.cells[1].cell_id / "cell.json").unlink()
    run_audit(config_file, out, quiet=True)
    assert calls == [1]
    changed = config_file.read_text().replace("gaussian:variance=1e-4", "gaussian:variance=1e-3")
    config_file.write_text(changed)
    run_audit(config_file, out, quiet=True)
    assert calls == [1, 1]


def test_an_interrupted_audit_keeps_finished_cells_and_continues(tmp_path, config_file, monkeypatch):
    out = tmp_path / "out"
    original = audit_group._run_cell
    done = []

    def interrupting(spec, *args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(spec.defense_index)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(audit_group, "_run_cell", interrupting)
    partial = run_audit(config_file, out, quiet=True)
    assert partial.interrupted and len(partial.cells) == 2
    assert "interrupted" in (out / "report.html").read_text()
    monkeypatch.setattr(audit_group, "_run_cell", original)
    complete = run_audit(config_file, out, quiet=True)
    assert not complete.interrupted and len(complete.cells) == 4
    assert [c.cell_id for c in complete.cells[:2]] == [c.cell_id for c in partial.cells]


def test_cli_audit_prints_verdicts_and_bad_configs_get_one_line(tmp_path, config_file):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(config_file), "--out", str(tmp_path / "cli"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "[leaks] mlp(hidden=64), batch 1, defense none" in result.output
    assert (tmp_path / "cli" / "report.html").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML.replace("fc-bias", "fc-bais"))
    result = runner.invoke(app, ["audit", str(bad), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "unknown attack 'fc-bais'" in result.output
    assert "Traceback" not in result.output


def test_attacks_restricted_to_models_make_only_those_cells():
    import yaml

    raw = yaml.safe_load(YAML) | {"models": ["lenet", "mlp"], "defenses": ["none", "half"],
                                  "attacks": ["inverting-gradients", {"name": "fc-bias", "models": ["mlp"]}]}
    cells = audit_cells(AuditConfig.from_mapping(raw))
    pairs = sorted({(c.model.name, c.attack.name) for c in cells})
    assert pairs == [("lenet", "inverting-gradients"), ("mlp", "fc-bias"), ("mlp", "inverting-gradients")]
    assert len(cells) == 6


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_audit_report_opens_in_headless_chromium(tmp_path, config_file):
    """The report is parsed and painted by a real browser: its DOM has the sections and the
    embedded figures, and the screenshot is a picture, not a blank page."""
    import subprocess

    import numpy as np
    from PIL import Image

    run_audit(config_file, tmp_path / "out", quiet=True)
    url = (tmp_path / "out" / "report.html").resolve().as_uri()
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<h2>Verdicts</h2>" in dom and "still recovers recognisable images" in dom
    assert dom.count("data:image/png;base64,") >= 3
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1100,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1100)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, tables and plots, not an empty page


def test_verdicts_for_attacks_without_images_and_refused_attacks(tmp_path):
    """fc-bias on LeNet recovers the classifier's input features, not images: the verdict says
    no image came back, and a refused attack is listed with its failed condition."""
    config = AuditConfig.from_mapping({"data": {"name": "photos", "n": 2, "size": 16}, "models": ["lenet"],
                                       "attacks": [{"name": "fc-bias", "options": {"robust": False}}],
                                       "defenses": ["none", "gaussian:variance=1e-6"],
                                       "utility": False})
    result = run_audit(config, tmp_path / "out", quiet=True)
    levels = {v["defense"]: v for v in result.verdicts}
    assert levels["none"]["level"] == "not-measured" and "no attack reconstructed images" in levels["none"]["text"]
    assert "Not applicable: fc-bias (valid only when: the gradient of a single sample" in levels["gaussian(variance=1e-06)"]["text"]
    assert "No utility training configured" in (tmp_path / "out" / "report.html").read_text()


def test_ctrl_c_inside_a_cell_does_not_store_it_as_finished(tmp_path, config_file, monkeypatch):
    """Ctrl-C while a cell's second update is being attacked: the cell is not stored, the audit
    says it was interrupted, and the rerun computes that cell in full."""
    from gradleak.attacks.analytic import FCBiasInversion

    out = tmp_path / "out"
    original = FCBiasInversion.reconstruct
    calls = []

    def interrupt_second(self, update, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, update, **kwargs)

    monkeypatch.setattr(FCBiasInversion, "reconstruct", interrupt_second)
    partial = run_audit(config_file, out, quiet=True)
    assert partial.interrupted and partial.cells == []
    assert not any(out.glob("cells/*/cell.json"))
    monkeypatch.setattr(FCBiasInversion, "reconstruct", original)
    complete = run_audit(config_file, out, quiet=True)
    first = complete.cells[0]
    assert first.status == "done" and len(first.psnr) == 2 and all(p >= 60 for p in first.psnr)


def test_resume_judges_stored_cells_by_the_current_verdict_and_reads_non_finite_numbers(tmp_path, config_file):
    out = tmp_path / "out"
    first = run_audit(config_file, out, quiet=True)
    cell_json = out / "cells" / first.cells[0].cell_id / "cell.json"
    stored = json.loads(cell_json.read_text())
    stored["result"]["summary"]["psnr_mean"] = "inf"   # what an exact float64 reconstruction stores
    stored["result"]["psnr"] = ["inf", stored["result"]["psnr"][1]]
    cell_json.write_text(json.dumps(stored))
    config_file.write_text(config_file.read_text() + "verdict: {recognisable_psnr: 1000, partial_psnr: 100}\n")
    again = run_audit(config_file, out, quiet=True)
    none = again.cells[0]
    assert none.summary["psnr_mean"] == float("inf") and none.levels == {"recognisable": 1, "partial": 1, "none": 0}
    verdict = next(v for v in again.verdicts if v["defense"] == "none")
    assert verdict["level"] == "leaks" and "1 of 2 images with PSNR >= 1000 dB; mean PSNR inf dB" in verdict["text"]

    # SSIM as a second criterion: the exact reconstructions (SSIM 1) count as recognisable by it ...
    assert all(s > 0.99 for s in none.ssim) and len(none.ssim) == 2
    config_file.write_text(config_file.read_text().replace(
        "verdict: {recognisable_psnr: 1000, partial_psnr: 100}",
        "verdict: {recognisable_psnr: 1000, partial_psnr: 100, recognisable_ssim: 0.99}"))
    by_ssim = run_audit(config_file, out, quiet=True)
    assert by_ssim.cells[0].levels == {"recognisable": 2, "partial": 0, "none": 0}
    assert "2 of 2 images with PSNR >= 1000 dB or SSIM >= 0.99" in next(
        v for v in by_ssim.verdicts if v["defense"] == "none")["text"]
    # ... and a cell stored before SSIM was kept is judged by PSNR alone, not dropped
    del stored["result"]["ssim"]
    cell_json.write_text(json.dumps(stored))
    assert run_audit(config_file, out, quiet=True).cells[0].levels == {"recognisable": 1, "partial": 1, "none": 0}
