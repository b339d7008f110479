"""Threat models: the SoK's A-H labels on runs and audit cells, and audits that put an honest
and a malicious server side by side ("an honest server gets X, a malicious one gets Y")."""

from __future__ import annotations

import json

import pytest
import torch

import gradleak as gl
from gradleak.attacks import get_attack
from gradleak.audit import load_audit_config, run_audit
from gradleak.models import MLP
from gradleak.pipeline import DataRequest, attack_simulated


@pytest.mark.parametrize("attack,threat,letter", [
    ("inverting-gradients", {}, "B"),
    ("fc-bias", {"batch_size_known": False}, "B"),
    ("inverting-gradients", {"labels_known": True}, "C"),
    ("fedavg", {}, "C"),
    ("inverting-gradients", {"bn_statistics": True}, "E"),
    ("imprint", {"server": "malicious"}, "G"),
    ("trap-weights", {"server": "malicious"}, "G"),
    ("fishing", {"server": "malicious"}, "F"),
])
def test_sok_letters_follow_what_the_attack_is_granted_and_uses(attack, threat, letter):
    threat_model = gl.ThreatModel(**threat)
    options = {"target": 0} if attack == "fishing" else {}
    label = threat_model.sok(get_attack(attack)(MLP(16, hidden=(8,), num_classes=2), threat_model, **options))
    assert label["id"] == letter and label["name"] == gl.SOK_THREAT_MODELS[letter][0] and label["why"]


def test_a_run_records_its_threat_model_and_the_report_shows_it(tmp_path):
    run = attack_simulated("fc-bias", tmp_path / "run", data=DataRequest("photos", 1, 16), model="mlp", quiet=True)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["threat_model"]["id"] == "B"
    assert "threat model <b>B</b> (Informed Eavesdropper" in (run.run_dir / "report.html").read_text()
    shared = attack_simulated("fc-bias", tmp_path / "labels", data=DataRequest("photos", 1, 16), model="mlp",
                              client=gl.ClientSetup(share_labels=True), quiet=True)
    assert json.loads((shared.run_dir / "config.json").read_text())["threat_model"]["id"] == "C"


AUDIT = """
name: honest and malicious
data: {{name: digits, n: 8, size: 16}}
models: [{{name: mlp, options: {{hidden: "64"}}}}]
attacks: {attacks}
defenses: [none]
batch_sizes: [8]
"""


def test_audit_puts_an_honest_and_a_malicious_server_side_by_side(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(AUDIT.format(attacks='[fc-bias, {name: imprint, options: {bins: 64}}, qian]'))
    result = run_audit(load_audit_config(both), tmp_path / "out", quiet=True)
    cells = {c.attack: c for c in result.cells}
    assert cells["imprint"].server == "malicious" and cells["imprint"].threat_model == "G"
    assert cells["fc-bias"].server == cells["qian"].server == "honest" and cells["qian"].threat_model == "B"
    assert cells["imprint"].levels["recognisable"] >= 6            # most of the 8 digits alone in a bin: exact
    assert cells["fc-bias"].status == "not-applicable"              # a batch of 8: no single-sample closed form
    (verdict,) = result.verdicts
    assert verdict["malicious_level"] == "leaks"
    honest_part, malicious_part = verdict["text"].split("A malicious server (SoK G): ")
    assert "an honest-but-curious server (SoK B): " in honest_part and "imprint" not in honest_part
    assert malicious_part.startswith("imprint (")
    stored = json.loads((tmp_path / "out" / "cells" / cells["imprint"].cell_id / "config.json").read_text())
    assert stored["threat_model"]["id"] == "G"
    assert "malicious (G)" in (tmp_path / "out" / "report.html").read_text()

    # the malicious cell served its own copy of the model: the honest cells are those of an audit without it
    alone = tmp_path / "honest.yaml"
    alone.write_text(AUDIT.format(attacks="[fc-bias, qian]"))
    honest = {c.attack: c for c in run_audit(load_audit_config(alone), tmp_path / "honest", quiet=True).cells}
    assert honest["qian"].psnr == cells["qian"].psnr and honest["qian"].status == cells["qian"].status
