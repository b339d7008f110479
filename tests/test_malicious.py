"""A malicious server (Robbing the Fed's imprint module): exact recovery of every sample alone
in its bin, from one FedSGD update, at any batch size."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gradleak import ClientSetup, DataSpec, ModelSpec, ThreatModel, fedsgd_update
from gradleak.attacks import ImprintAttack, ImprintedModel, imprint_cuts
from gradleak.cli import app
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import match, psnr
from gradleak.pipeline import DataRequest, attack_simulated


def _served(faces, bins, dtype=torch.float64):
    model = ModelSpec("lenet", dtype="float64" if dtype == torch.float64 else "float32").build((1, 25, 25), 2).module
    spec = DataSpec.from_images(faces.images[100:].to(dtype))
    attack = ImprintAttack(model, ThreatModel(server="malicious"), bins=bins)
    served = attack.serve(model, (1, 25, 25), spec.normalize(faces.images[100:].to(dtype)))   # public: other faces
    return attack, served, spec


def test_every_sample_alone_in_its_bin_comes_back_exactly(faces):
    attack, served, spec = _served(faces, bins=48)
    images, labels = faces.images[:16].double(), faces.labels[:16]
    update = fedsgd_update(served, images, labels, spec=spec)
    rec = attack.reconstruct(update)
    # which samples are alone in their bin, from the truth and the cuts (not from the attack)
    measurement = spec.normalize(images).flatten(1).mean(1)
    cuts = -served.imprint.bias.detach()
    bins = torch.bucketize(measurement, cuts, right=False) - 1   # bin i: cut_i < m <= cut_{i+1}
    alone = [k for k in range(16) if bins[k] >= 0 and int((bins == bins[k]).sum()) == 1]
    scores = psnr(rec.images[match(rec.images, images)].clamp(0, 1), images)
    exact = [k for k in range(16) if scores[k] >= 100]
    assert exact == alone and len(alone) >= 4  # public images (non-faces) differ from these faces: fewer alone
    assert f"{rec.images.shape[0]} of 48 bins hold samples" in rec.notes[0]


def test_the_served_model_computes_nearly_what_the_model_computes(faces):
    attack, served, spec = _served(faces, bins=32)
    x = spec.normalize(faces.images[:8].double())
    with torch.no_grad():
        assert torch.allclose(served(x), served.model(x), atol=1e-2)


def test_an_honest_server_or_an_unmodified_model_is_refused(faces):
    model = ModelSpec("lenet").build((1, 25, 25), 2).module
    with pytest.raises(AttackNotApplicable, match="needs ThreatModel\\(server='malicious'\\)"):
        ImprintAttack(model, ThreatModel()).serve(model, (1, 25, 25), None)
    update = fedsgd_update(model, faces.images[:2], faces.labels[:2])
    with pytest.raises(AttackNotApplicable, match="no imprint.weight"):
        ImprintAttack(model, ThreatModel(server="malicious")).reconstruct(update)


def test_cuts_follow_the_public_images_and_default_to_a_standard_normal(faces):
    assert torch.allclose(imprint_cuts(None, 3), torch.tensor([-0.6745, 0.0, 0.6745], dtype=torch.float64), atol=1e-4)
    public = faces.images[100:].flatten(1).mean(1)
    cuts = imprint_cuts(faces.images[100:], 9)
    assert abs(float(cuts[4]) - float(public.mean())) < 1e-6 and bool((cuts[1:] > cuts[:-1]).all())


def test_large_batches_through_the_pipeline_and_the_cli(tmp_path):
    run = attack_simulated("imprint", tmp_path / "run", data=DataRequest("faces", n=64, size=None), model="lenet",
                           client=ClientSetup(batch_size=64), threat=ThreatModel(server="malicious"),
                           options={"bins": 512}, quiet=True)
    exact = sum(row["psnr"] is not None and row["psnr"] >= 60 for row in run.scores.per_image)
    assert exact >= 48  # about B exp(-B/N) = 56 of 64 alone in their bins
    assert len(run.scores.per_image) == 64 and run.scores.summary["n_exact"] == exact  # every image has its row
    assert run.scores.summary["n_recovered"] == sum(row["recovered"] for row in run.scores.per_image)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threat"]["server"] == "malicious"
    result = CliRunner().invoke(app, ["attack", "--attack", "imprint", "--data", "faces", "--size", "25", "--n", "8",
                                      "-c", "batch_size=8", "--model", "lenet", "--out", str(tmp_path / "cli"), "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["summary"]["psnr_mean"] > 30


def test_trap_weights_recover_the_samples_that_fire_a_unit_alone(faces):
    from gradleak.attacks import TrapWeights

    model = ModelSpec("mlp", {"hidden": "1000"}, dtype="float64").build((1, 25, 25), 2).module
    spec = DataSpec.from_images(faces.images[100:].double())
    attack = TrapWeights(model, ThreatModel(server="malicious"), rate=0.02)
    served = attack.serve(model, (1, 25, 25), spec.normalize(faces.images[150:].double()))
    images = faces.images[:16].double()
    update = fedsgd_update(served, images, faces.labels[:16], spec=spec)
    # the samples that fire some unit alone, from the truth (not from the attack)
    pre = spec.normalize(images).flatten(1) @ served.layers["fc1"].weight.detach().T + served.layers["fc1"].bias.detach()
    fires = pre > 0
    alone = [k for k in range(16) if bool((fires[k] & (fires.sum(0) == 1)).any())]
    rec = attack.reconstruct(update)
    scores = psnr(rec.images[match(rec.images, images)].clamp(0, 1), images)
    exact = [k for k in range(16) if scores[k] >= 100]
    assert set(exact) <= set(alone) and len(exact) >= 0.75 * len(alone) and len(alone) >= 8  # exact = fired alone
    with pytest.raises(AttackNotApplicable, match="no fully connected layer with bias is fed the model input"):
        TrapWeights(ModelSpec("lenet").build((1, 25, 25), 2).module, ThreatModel(server="malicious")).serve(
            ModelSpec("lenet").build((1, 25, 25), 2).module, (1, 25, 25), None)


def test_the_client_inspection_refuses_manipulated_models_and_passes_honest_ones(tmp_path, faces):
    from gradleak.attacks import TrapWeights
    from gradleak.defenses import ClientRefused, inspect_model

    spec = DataSpec.from_images(faces.images[100:])
    inputs, public = spec.normalize(faces.images[:8]), spec.normalize(faces.images[150:])
    for seed in range(10):
        for name, options in (("mlp", {}), ("lenet", {}), ("convnet", {"width": 4})):
            assert inspect_model(ModelSpec(name, options, seed=seed).build((1, 25, 25), 2).module, inputs) == []
    lenet = ModelSpec("lenet").build((1, 25, 25), 2).module
    imprinted = ImprintAttack(lenet, ThreatModel(server="malicious")).serve(lenet, (1, 25, 25), public)
    assert "128 of 128 rows measure the same direction" in inspect_model(imprinted, inputs)[0]
    mlp = ModelSpec("mlp", {"hidden": "1000"}).build((1, 25, 25), 2).module
    trapped = TrapWeights(mlp, ThreatModel(server="malicious")).serve(mlp, (1, 25, 25), public)
    assert "fire for" in inspect_model(trapped, inputs)[0]
    from gradleak.attacks import ClassFishing

    lenet = ModelSpec("lenet").build((1, 25, 25), 2).module
    fishing = ClassFishing(lenet, ThreatModel(server="malicious"), target=0).serve(lenet, (1, 25, 25), public)
    assert inspect_model(fishing, inputs) == ["fc: 1 of 2 classifier rows are zero (fishing for one class?)"]
    with pytest.raises(ClientRefused, match="refused to train on it: imprint"):
        attack_simulated("imprint", tmp_path / "r", data=DataRequest("faces", n=8, size=None), model="lenet",
                         client=ClientSetup(batch_size=8), threat=ThreatModel(server="malicious"),
                         defenses=["inspect-model"], quiet=True)


@pytest.mark.slow
def test_fishing_isolates_the_one_sample_of_the_target_class(tmp_path, digits):
    labels = digits.labels[:8].tolist()
    target = next(c for c in range(10) if labels.count(c) == 1)
    common = dict(data=DataRequest("digits", n=8, size=16), model="lenet", client=ClientSetup(batch_size=8), quiet=True)
    fished = attack_simulated("fishing", tmp_path / "fish", threat=ThreatModel(server="malicious"),
                              options={"target": target, "iterations": 400}, **common)
    (row,) = [r for r in fished.scores.per_image if r["psnr"] is not None]
    assert row["index"] == labels.index(target)            # the reconstruction is the target-class sample
    honest = attack_simulated("inverting-gradients", tmp_path / "honest", options={"iterations": 400}, **common)
    honest_psnr = next(r["psnr"] for r in honest.scores.per_image if r["index"] == row["index"])
    assert row["psnr"] > honest_psnr + 3                   # magnified: far better than the honest batch attack
