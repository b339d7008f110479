"""Per-image shares of a FedSGD update (gradleak.shares): which images an update carries.

Softmax regression has them in closed form, ``||g_i||^2 = ||p_i - e_{y_i}||^2 (||x_i||^2 + 1)``, so the
shares are checked to float64 precision; a confidently classified image's share collapses as
the module's notes say; FedAvg deltas and train-mode BatchNorm are refused by name; the update
residual carries the shares of a reconstruction (truth-free) and keeps them through JSON."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.errors import AttackNotApplicable
from gradleak.residual import Residual, carried_text, summary_text, update_residual, update_shares
from gradleak.shares import carried

from carry_support import batch_carried_by


def _softmax_regression(digits, seed=0):
    torch.manual_seed(seed)
    d = digits.images[0].numel()
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 10)).double()


def test_shares_match_softmax_regressions_closed_form(digits):
    model = _softmax_regression(digits)
    x, y = digits.images[:6].double(), digits.labels[:6]
    update = gl.fedsgd_update(model, x, y)
    shares = update_shares(model, update, x, y)
    z = (update.data_spec or gl.DataSpec()).normalize(x)      # what the client fed the model
    with torch.no_grad():
        p = torch.softmax(model(z), -1)
    energy = (p - nn.functional.one_hot(y, 10).double()).pow(2).sum(-1) * (z.flatten(1).pow(2).sum(-1) + 1)
    assert shares.dtype == torch.float64 and shares.shape == (6,)
    assert torch.allclose(shares, energy / energy.sum(), rtol=1e-12, atol=0)
    assert abs(float(shares.sum()) - 1.0) < 1e-12


def test_a_confidently_classified_image_holds_almost_none_of_the_update(digits):
    """Push image 0's logit for its own label up (the classifier bias, as training would): its share collapses
    while the images it does not concern keep theirs."""
    model = _softmax_regression(digits)
    x, y = digits.images[:4].double(), digits.labels[:4]
    before = update_shares(model, gl.fedsgd_update(model, x, y), x, y)
    own = int(y[0])
    assert int((y == own).sum()) == 1
    with torch.no_grad():
        model[1].bias[own] += 30.0
    after = update_shares(model, gl.fedsgd_update(model, x, y), x, y)
    assert before[0] > 0.05 and after[0] < 1e-12
    assert carried(before) == 4 and carried(after) == 3


def test_identical_images_have_identical_shares(photos):
    model = gl.build_model("convnet", (3, 32, 32), 10, width=8).eval()
    x = torch.cat([photos.images[:2], photos.images[:1]])
    y = torch.cat([photos.labels[:2], photos.labels[:1]])
    shares = update_shares(model, gl.fedsgd_update(model, x, y), x, y)
    assert shares[0] == shares[2] and shares[0] != shares[1]


def test_coupled_protocols_are_refused_by_name(photos):
    model = gl.build_model("convnet", (3, 32, 32), 10, width=8)
    x, y = photos.images[:3], photos.labels[:3]
    delta = gl.fedavg_update(model.eval(), x, y, lr=0.1, local_steps=2)
    with pytest.raises(AttackNotApplicable, match="FedAvg delta"):
        update_shares(model, delta, x, y)
    train = gl.fedsgd_update(model.train(), x, y)
    assert train.mode == "train"
    with pytest.raises(AttackNotApplicable, match="train-mode BatchNorm"):
        update_shares(model, train, x, y)
    assert update_residual(model, train, x, y).shares is None


def test_the_residual_records_a_reconstructions_shares_through_json(photos):
    """Truth-free: the shares of what the server holds (here the true batch, then a blurred copy of it)."""
    model = gl.build_model("convnet", (3, 32, 32), 10, width=8).eval()
    x, y = photos.images[:4], photos.labels[:4]
    update = gl.fedsgd_update(model, x, y)
    residual = update_residual(model, update, x, y)
    assert residual.shares is not None and len(residual.shares) == 4
    assert torch.allclose(torch.tensor(residual.shares, dtype=torch.float64), update_shares(model, update, x, y))
    assert Residual.from_json(residual.to_json()) == residual
    assert Residual.from_json({**residual.to_json(), "shares": ["0.5", None]}).shares is None   # a tampered file
    one = update_residual(model, gl.fedsgd_update(model, x[:1], y[:1]), x[:1], y[:1])
    assert one.shares is None and one.value is not None


def test_a_run_folder_shows_each_images_share_without_the_truth(digits, tmp_path):
    """The run's metrics, its grid's captions and its HTML page say which images carry the update."""
    import json

    from PIL import Image

    from gradleak.attacks.base import Reconstruction
    from gradleak.report import share_notes
    from gradleak.runs import write_run

    model = _softmax_regression(digits).float()
    x, y = digits.images[:4], digits.labels[:4]
    with torch.no_grad():
        model[1].bias[int(y[0])] += 30.0          # image 0 classified with certainty: it leaves the update
    update = gl.fedsgd_update(model, x, y)
    residual = update_residual(model, update, x, y)
    rec = Reconstruction(images=x.clone(), labels=y.clone(), attack="truth")
    run = write_run(tmp_path / "run", rec, residuals=[residual], use_lpips=False)
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    shares = metrics["residual"]["per_update"][0]["shares"]
    assert len(shares) == 4 and shares[0] < 1e-6 and carried(shares) == 3
    page = (run.run_dir / "report.html").read_text()
    assert "carrying their update" in page and "3 of 4 images carry their update" in page
    assert carried_text(metrics["residual"]) == "3 of 4 images carry their update (share >= 1 %)"
    assert "carry" not in summary_text(metrics["residual"])
    tampered = {"per_update": [{**metrics["residual"]["per_update"][0], "shares": [0.5, "x"]}]}
    assert carried_text(tampered) == ""                      # a hand-edited metrics.json: no row, no crash
    notes = share_notes(shares, 4)
    assert notes[0].startswith("share ") and "e-" in notes[0] and notes[1].endswith(" %")
    plain = write_run(tmp_path / "plain", rec, use_lpips=False)
    with Image.open(run.run_dir / "grid.png") as shown, Image.open(plain.run_dir / "grid.png") as bare:
        assert shown.size == bare.size and shown.tobytes() != bare.tobytes()   # the captions are drawn
    assert share_notes(shares, 3) is None


def test_a_run_whose_labels_are_the_truths_tensor_is_written(digits, tmp_path):
    """The same tensor as the reconstruction's labels and the true labels (a user's shortcut) once made
    safetensors refuse the run ("tensors share memory"); it is written, and reads back."""
    from gradleak.attacks.base import Reconstruction
    from gradleak.runs import load_run, write_run

    x, y = digits.images[:2], digits.labels[:2]
    run = write_run(tmp_path / "run", Reconstruction(images=x.clone(), labels=y, attack="truth"), originals=x,
                    true_labels=y, use_lpips=False)
    reconstruction, tensors, metrics = load_run(run.run_dir)
    assert torch.equal(reconstruction.labels, y) and torch.equal(tensors["true_labels"], y)
    assert metrics["summary"]["label_accuracy"] == 1.0


def test_carried_reconstructs_the_image_that_carries_a_batchs_update():
    """carried=1 with the observed output gradient: the one image holding all of the update comes back
    (to > 40 dB), with its label; the notes say it is 1 of 4 and the residual never certifies a part."""
    from gradleak.metrics import score

    model, x, y = batch_carried_by(1)
    update = gl.fedsgd_update(model, x, y)
    shares = update_shares(model, update, x, y)
    assert shares[0] > 1 - 1e-12
    rec = gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), carried=1, output_gradient="observed",
                                               iterations=300, tv=0).reconstruct(update)
    rows = sorted(score(rec.images, x, use_lpips=False).per_image, key=lambda r: r["index"])
    assert rec.images.shape[0] == 1 and int(rec.labels[0]) == int(y[0])
    assert rows[0]["matched_to"] == 0 and rows[0]["psnr"] > 40
    assert rec.notes[0].startswith("1 of the batch's 4 images reconstructed (carried=1)")
    residual = update_residual(model, update, rec.images, rec.labels)
    assert not residual.certified and "partial recovery" in residual.reason


def test_carried_is_refused_above_the_batch_and_with_granted_labels():
    from gradleak.errors import ConfigError

    model, x, y = batch_carried_by(1)
    update = gl.fedsgd_update(model, x, y, share_labels=True)
    with pytest.raises(ConfigError, match="carried=5 is more than the batch's 4 images"):
        gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), carried=5, iterations=2).reconstruct(update)
    with pytest.raises(ConfigError, match="labels='given' with carried=1"):
        gl.get_attack("inverting-gradients")(model, gl.ThreatModel(labels_known=True), carried=1, labels="given",
                                             iterations=2).reconstruct(update)
    with pytest.raises(ConfigError, match="carried"):
        gl.get_attack("inverting-gradients")(model, gl.ThreatModel(), carried=0)
