"""The update residual (truth-free): exact recoveries are certified, partial, perturbed and
approximate ones are not; labels are solved in closed form when an attack gives none;
``attacks="auto"`` plans from the analyser and stops at the first certified exact; the CLI
and the audit record the residual."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import gradleak as gl
from gradleak.auto import plan_attacks, split_options
from gradleak.cli import app
from gradleak.errors import ConfigError
from gradleak.models import ModelSpec
from gradleak.pipeline import attack_auto, attack_updates, make_attack
from gradleak.residual import (certify_tolerance, reconstruction_residual, simulate_update, solve_labels,
                               update_residual)


def _built(name="mlp", options=None, dtype="float32", shape=(3, 32, 32), classes=10):
    return ModelSpec(name, options or {}, device="cpu", dtype=dtype).build(shape, classes)


def test_the_true_batch_reproduces_its_update_exactly(digits):
    """simulate_update is the client: FedSGD gradient and a FedAvg delta of several full steps."""
    built = _built("mlp", {"hidden": [32]}, "float64", tuple(digits.images.shape[1:]))
    images, labels = digits.images[:3].double(), digits.labels[:3]
    for update in (gl.fedsgd_update(built.module, images, labels),
                   gl.fedavg_update(built.module, images, labels, lr=0.1, local_steps=3)):
        assert update_residual(built.module, update, images, labels).value < 1e-13
        simulated = simulate_update(built.module, update, images, labels)
        assert all(torch.allclose(simulated[n], t, rtol=0, atol=1e-15) for n, t in update.tensors.items())


def test_closed_forms_are_certified_in_both_precisions(photos):
    for dtype, bound in (("float32", 1e-6), ("float64", 1e-13)):
        built = _built(dtype=dtype)
        update = gl.fedsgd_update(built.module, photos.images[:1].to(built.dtype), photos.labels[:1])
        attack = make_attack("fc-bias", built.module, gl.ThreatModel(), {})
        residual = reconstruction_residual(built.module, update, attack_updates(attack, [update], quiet=True))
        assert residual.certified and residual.value < bound and residual.labels == "reconstruction"
        assert residual.tolerance == certify_tolerance(built.dtype) == 1e4 * torch.finfo(built.dtype).eps


def test_a_perturbed_update_and_a_wrong_label_are_not_certified(photos):
    built = _built()
    images, labels = photos.images[:1], photos.labels[:1]
    update = gl.fedsgd_update(built.module, images, labels)
    noisy = gl.SharedUpdate(**{**vars(update), "tensors": {n: t + 1e-3 * torch.randn_like(t)
                                                            for n, t in update.tensors.items()}})
    rec = attack_updates(make_attack("fc-bias", built.module, gl.ThreatModel(), {}), [noisy], quiet=True)
    residual = reconstruction_residual(built.module, noisy, rec)
    assert not residual.certified and residual.value > certify_tolerance(torch.float32)
    wrong = update_residual(built.module, update, images, (labels + 1) % 10)
    assert not wrong.certified and wrong.value > 1e-2


def test_a_partial_recovery_is_never_certified(digits):
    """Two images of a batch of four reproduce nothing certifiable; a batch size the server does not
    know is never certified either, even for the true images."""
    built = _built("mlp", {"hidden": [64]}, "float64", tuple(digits.images.shape[1:]))
    images, labels = digits.images[:4].double(), digits.labels[:4]
    update = gl.fedsgd_update(built.module, images, labels)
    half = update_residual(built.module, update, images[:2], labels[:2])
    assert not half.certified and "2 image(s) recovered of a batch of 4" in half.reason
    hidden = update_residual(built.module, gl.ThreatModel(batch_size_known=False).observe(update), images, labels)
    assert hidden.value < 1e-12 and not hidden.certified and "batch size is not known" in hidden.reason


def test_labels_are_solved_from_the_classifier_gradient(digits):
    built = _built("mlp", {"hidden": [64]}, "float32", tuple(digits.images.shape[1:]))
    images, labels = digits.images[:6], torch.tensor([3, 3, 1, 7, 3, 0])     # repeated labels
    for update in (gl.fedsgd_update(built.module, images, labels),
                   gl.fedavg_update(built.module, images, labels, lr=0.05, local_steps=1)):
        assert solve_labels(built.module, update, images).tolist() == labels.tolist()
    residual = update_residual(built.module, update, images)
    assert residual.certified and residual.labels == "solved" and list(residual.label_values) == labels.tolist()


def test_qian_on_a_batch_is_certified_with_solved_labels(digits):
    built = _built("mlp", {"hidden": [256]}, "float32", tuple(digits.images.shape[1:]))
    images, labels = digits.images[:4], digits.labels[:4]
    update = gl.fedsgd_update(built.module, images, labels)
    rec = attack_updates(make_attack("qian", built.module, gl.ThreatModel(), {}), [update], quiet=True)
    assert rec.labels is None
    residual = reconstruction_residual(built.module, update, rec, gl.ThreatModel())
    assert residual.certified and residual.labels == "solved"
    assert sorted(residual.label_values) == sorted(labels.tolist())


def test_auto_plans_exact_closed_forms_first_and_gradient_matching_for_local_steps(photos):
    built = _built()
    images, labels = photos.images[:1], photos.labels[:1]
    one = gl.fedsgd_update(built.module, images, labels)
    plan, _ = plan_attacks(built.module, one, num_classes=10, options={"iterations": 5, "qian.robust": False})
    names = [p.name for p in plan]
    assert names[0] == "fc-bias" and names[-1] == "inverting-gradients" and "qian" in names
    assert plan[-1].options == {"iterations": 5} and next(p for p in plan if p.name == "qian").options == {
        "robust": False}
    steps = gl.fedavg_update(built.module, photos.images[:2], photos.labels[:2], lr=0.1, local_steps=2,
                             local_batch_size=1)
    plan, why = plan_attacks(built.module, steps, num_classes=10)
    assert [p.name for p in plan] == ["fedavg"] and "several local steps" in why
    unknown = gl.SharedUpdate(**{**vars(steps), "local_lr": None})
    assert plan_attacks(built.module, unknown, num_classes=10) == ([], "the delta's learning rate is unknown: no "
                                                                        "attack can model its local steps")
    with pytest.raises(ConfigError, match="takes no option 'nope'"):
        split_options({"qian.nope": 1})


def test_auto_stops_at_the_first_certified_exact(photos):
    built = _built()
    update = gl.fedsgd_update(built.module, photos.images[:1], photos.labels[:1])
    rec, residual, attempts, _ = attack_auto(built.module, update, gl.ThreatModel(), num_classes=10, quiet=True)
    assert [a.attack for a in attempts] == ["fc-bias"] and residual.certified and rec.attack == "fc-bias"


def test_cli_attacks_an_update_file_with_auto_by_default(tmp_path):
    runner = CliRunner()
    update, truth, out = tmp_path / "u.safetensors", tmp_path / "t.safetensors", tmp_path / "run"
    made = runner.invoke(app, ["capture", "--out", str(update), "--model", "mlp", "--n", "1", "--truth", str(truth),
                               "-q"])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["attack", str(update), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "residual" in result.output and "certified exact (truth-free)" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attack"] == "fc-bias" and metrics["residual"]["certified"] == 1
    assert [a["attack"] for a in metrics["auto"]["attempts"]] == ["fc-bias"]
    assert "certified exact" in (out / "report.html").read_text()
    refused = runner.invoke(app, ["attack", "--attack", "auto", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--attack auto attacks an update file" in refused.output
