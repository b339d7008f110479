"""Fitted mixture weights (``MatchingConfig(mixture="fitted")``, gradleak.attacks._mixture).

The weights are the nonnegative least-squares fit of the candidates' per-image gradients to the
update, so at the client's own images they are the client's ``1/B`` and each image's part is
``||g_i|| / sum_j ||g_j||`` (checked against the shares to float64 precision); the solver agrees
with SciPy's; a batch where two of four images carry the update comes back with both images and
parts that say which candidates explain it; the protocols without per-image gradients are refused."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import nnls

import gradleak as gl
from gradleak.attacks._mixture import fitted_weights, mixture_loss, nonnegative_least_squares, per_image_gradients
from gradleak.attacks._targets import batching_refused
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.losses import get_loss
from gradleak.residual import update_shares

from carry_support import batch_carried_by


def test_nonnegative_least_squares_agrees_with_scipy():
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        b = int(torch.randint(1, 9, (), generator=generator))
        G = torch.randn(40, b, dtype=torch.float64, generator=generator)
        u = torch.randn(40, dtype=torch.float64, generator=generator)
        w = nonnegative_least_squares(G.T @ G, G.T @ u)
        reference, _ = nnls(G.numpy(), u.numpy())
        assert (w >= 0).all()
        assert torch.allclose(w, torch.from_numpy(reference), atol=1e-9, rtol=0)


def _state(model):
    return {n: p.detach() for n, p in model.named_parameters()}, {n: b for n, b in model.named_buffers()}


def test_at_the_clients_images_the_weights_are_its_mean_and_the_parts_its_gradient_norms(photos):
    torch.manual_seed(0)
    model = gl.build_model("convnet", (3, 32, 32), 10, width=8).double().eval()
    x, y = photos.images[:4].double(), photos.labels[:4]
    update = gl.fedsgd_update(model, x, y)
    names = list(update.tensors)
    params, buffers = _state(model)
    z = (update.data_spec or gl.DataSpec()).normalize(x)
    G = per_image_gradients(model, params, buffers, get_loss("cross_entropy"), z, y, names)
    target = torch.cat([update.tensors[n].reshape(-1) for n in names])
    weights, parts = fitted_weights(G, target)
    assert torch.allclose(weights, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-10, rtol=0)
    shares = update_shares(model, update, x, y)
    assert torch.allclose(parts, shares.sqrt() / shares.sqrt().sum(), atol=1e-10, rtol=0)


def test_the_mixture_loss_at_equal_weights_is_the_clients_mean_loss(photos):
    torch.manual_seed(0)
    model = gl.build_model("convnet", (3, 32, 32), 10, width=8).double().eval()
    x, y = photos.images[:3].double(), photos.labels[:3]
    update = gl.fedsgd_update(model, x, y)
    params, buffers = _state(model)
    z = (update.data_spec or gl.DataSpec()).normalize(x)
    loss = mixture_loss(model, buffers, get_loss("cross_entropy"), z, y, torch.full((3,), 1 / 3, dtype=torch.float64))
    gradient = torch.func.grad(loss)(params)
    for name, value in update.tensors.items():
        assert torch.allclose(gradient[name], value, atol=1e-13, rtol=0)


def test_no_positive_mixture_falls_back_to_the_mean():
    G = torch.eye(3, dtype=torch.float64)
    weights, parts = fitted_weights(G, -torch.ones(3, dtype=torch.float64))
    assert weights.tolist() == [1 / 3] * 3 and parts.tolist() == [1 / 3] * 3


def test_a_fitted_mixture_recovers_the_carried_images_and_says_which_explain_the_update():
    from gradleak.metrics import score

    model, x, y = batch_carried_by(2)
    update = gl.fedsgd_update(model, x, y, share_labels=True)
    rec = gl.get_attack("inverting-gradients")(model, gl.ThreatModel(labels_known=True), labels="given",
                                               mixture="fitted", iterations=500, tv=0).reconstruct(update)
    rows = {r["index"]: r for r in score(rec.images, x, use_lpips=False).per_image}
    carried = [r for r in rows.values() if r["matched_to"] in (0, 1)]
    assert len(carried) == 2 and min(r["psnr"] for r in carried) > 60
    note = next(n for n in rec.notes if n.startswith("mixture fitted to the update"))
    parts = [float(v) for v in note.split(": ")[1].split(", ")]
    shares = update_shares(model, update, x, y)
    truth = (shares.sqrt() / shares.sqrt().sum()).tolist()
    for r in carried:     # the reconstruction's part of the update is the true image's
        assert abs(parts[r["index"]] - truth[r["matched_to"]]) < 0.01
    assert sum(parts[r["index"]] for r in rows.values() if r["matched_to"] in (2, 3)) < 1e-3


def test_protocols_without_per_image_gradients_are_refused_by_name(digits, photos):
    torch.manual_seed(0)
    x, y = digits.images[:2], digits.labels[:2]
    mlp = gl.build_model("mlp", tuple(digits.images.shape[1:]), 10, hidden=[16])
    delta = gl.fedavg_update(mlp, x, y, local_steps=2, lr=0.1)
    with pytest.raises(AttackNotApplicable, match="mixture='fitted': a FedAvg delta"):
        gl.get_attack("inverting-gradients")(mlp, gl.ThreatModel(), mixture="fitted", iterations=2).reconstruct(delta)
    convnet = gl.build_model("convnet", (3, 32, 32), 10, width=4).train()
    update = gl.fedsgd_update(convnet, photos.images[:2], photos.labels[:2])
    with pytest.raises(AttackNotApplicable, match="mixture='fitted': train-mode BatchNorm"):
        gl.get_attack("inverting-gradients")(convnet, gl.ThreatModel(), mixture="fitted", iterations=2).reconstruct(update)
    for bad in ({"compile": True}, {"batched_restarts": "vmap", "restarts": 2}):
        with pytest.raises(ConfigError, match="mixture='fitted'"):
            gl.get_attack("inverting-gradients")(mlp, gl.ThreatModel(), mixture="fitted", **bad)
    with pytest.raises(ConfigError, match="mixture must be one of"):
        gl.get_attack("inverting-gradients")(mlp, gl.ThreatModel(), mixture="median")
    attack = gl.get_attack("inverting-gradients")(mlp, gl.ThreatModel(), mixture="fitted")
    assert "mixture='fitted'" in batching_refused(attack)


def test_a_runs_grid_captions_each_image_with_its_part_of_the_fitted_mixture(tmp_path, capsys):
    """Notes of two updates give four parts, in order; a hand-edited note gives none; a run whose notes hold
    the parts captions its grid with them instead of the equal-weight shares."""
    from PIL import Image

    from gradleak.attacks.base import Reconstruction
    from gradleak.cli._common import summary
    from gradleak.residual import update_residual
    from gradleak.runs import write_run
    from gradleak.shares import MIXTURE_PARTS_NOTE, mixture_parts

    notes = ["update 0: matched 4 of 4 entries", f"update 0: {MIXTURE_PARTS_NOTE}0.900, 0.100",
             f"update 1: {MIXTURE_PARTS_NOTE}0.000, 1.000"]
    assert mixture_parts(notes, 4) == [0.9, 0.1, 0.0, 1.0]
    assert mixture_parts(notes, 3) is None
    assert mixture_parts([f"{MIXTURE_PARTS_NOTE}0.5, x"], 2) is None
    assert mixture_parts([f"{MIXTURE_PARTS_NOTE}0.5, 7"], 2) is None
    model, x, y = batch_carried_by(2)
    residual = update_residual(model, gl.fedsgd_update(model, x, y), x, y)
    grids = []
    for name, extra in (("shares", []), ("parts", [f"{MIXTURE_PARTS_NOTE}0.465, 0.535, 0.000, 0.000"])):
        rec = Reconstruction(images=x.clone(), labels=y.clone(), attack="truth", notes=extra)
        run = write_run(tmp_path / name, rec, residuals=[residual], use_lpips=False)
        with Image.open(run.run_dir / "grid.png") as grid:
            grids.append(grid.tobytes())
        page = (run.run_dir / "report.html").read_text()
        assert ("2 of 4 images hold at least 1 % of the fitted mixture" in page) == (name == "parts")
        summary(run, quiet=False)       # the CLI's line: the parts where the run fitted a mixture, else the shares
        line = capsys.readouterr().out
        assert ("2 of 4 images hold at least 1 %" in line) == (name == "parts")
        assert ("2 of 4 images carry their update" in line) == (name == "shares")
    assert grids[0] != grids[1]
    assert mixture_parts(["nothing"], None) is None
    assert mixture_parts([123, None, f"{MIXTURE_PARTS_NOTE}0.5, 0.5"], None) == [0.5, 0.5]   # a hand-edited list
