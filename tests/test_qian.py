"""Qian et al.: single inputs at any depth, exact batches where h >= B separates them, CNN condition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import DataSpec, ThreatModel, fedsgd_update
from gradleak.attacks.qian import QianInversion, qian_batch_inversion, qian_cnn_condition
from gradleak.attacks._chain import trace_chain
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import match, psnr
from gradleak.models import MLP
from gradleak.models.qian import QianConvHead

FLOORS = {torch.float32: 60.0, torch.float64: 100.0}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])


def _matched_psnr(images, originals):
    perm = match(images, originals)
    assert (perm >= 0).all()
    return psnr(images[perm], originals)


@DTYPES
def test_batch_of_eight_photos_recovered_exactly(photos, dtype):
    torch.manual_seed(0)
    model = MLP(3 * 32 * 32, hidden=(256, 32), num_classes=10).to(dtype)
    images = photos.images[:8].to(dtype)
    update = fedsgd_update(model, images, photos.labels[:8], spec=DataSpec.from_images(photos.images))
    result = QianInversion(model).reconstruct(update)
    assert result.images.shape == images.shape
    assert float(_matched_psnr(result.images, images).min()) >= FLOORS[dtype]
    assert any("all 8 samples recovered exactly" in n for n in result.notes)


@DTYPES
@pytest.mark.parametrize("hidden,activation", [((1, 1, 1, 1), "tanh"), ((1, 8, 8), "sigmoid"), ((64, 32, 16, 8), "relu")])
def test_single_input_any_depth_even_one_hidden_unit(photos, dtype, hidden, activation):
    torch.manual_seed(1)
    model = MLP(3 * 32 * 32, hidden=hidden, num_classes=10, activation=activation).to(dtype)
    image = photos.images[6:7].to(dtype)
    result = QianInversion(model).reconstruct(fedsgd_update(model, image, photos.labels[6:7]))
    assert float(psnr(result.images, image)[0]) >= FLOORS[dtype]


def test_fewer_units_than_batch_is_reported(photos):
    torch.manual_seed(2)
    model = MLP(3 * 32 * 32, hidden=(4,), num_classes=10).double()
    images = photos.images[:8].double()
    update = fedsgd_update(model, images, photos.labels[:8])
    try:
        result = QianInversion(model).reconstruct(update)
    except AttackNotApplicable as reason:
        assert "units that separate the samples" in reason.condition
    else:
        assert any("Qian's condition fails: 4 hidden units < batch size 8" in n for n in result.notes)
        assert result.images.shape[0] < 8 and any("not recoverable" in n for n in result.notes)


def test_sigmoid_batch_cannot_be_separated(photos):
    torch.manual_seed(3)
    model = MLP(3 * 32 * 32, hidden=(64,), num_classes=10, activation="sigmoid").double()
    update = fedsgd_update(model, photos.images[:4].double(), photos.labels[:4])
    with pytest.raises(AttackNotApplicable, match="could be separated"):
        QianInversion(model).reconstruct(update)


def test_function_level_batch_inversion(photos):
    torch.manual_seed(4)
    layer = nn.Linear(3 * 32 * 32, 48).double()
    x = photos.images[:3].double().reshape(3, -1)
    z = layer(x)
    delta = (z > 0).double() * torch.randn(3, 48, dtype=torch.float64)   # ReLU: zero signal where inactive
    result = qian_batch_inversion(delta.T @ x, delta.sum(0), layer.weight.detach(), layer.bias.detach(), batch_size=3)
    assert result.complete and result.rank == 3
    err = torch.cdist(result.x, x).min(dim=1).values.max()
    assert float(err) < 1e-9


@pytest.mark.parametrize("kernels,stride,holds", [(4, 1, True), (8, 2, False)])
def test_cnn_condition_both_sides(photos, kernels, stride, holds):
    small = photos.resize(16)
    torch.manual_seed(5)
    model = QianConvHead(kernels, stride).double()
    image = small.images[2:3].double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    check = qian_cnn_condition(trace_chain(model, (3, 16, 16), params, {}).layers[0])
    assert check.holds is holds and check.required == (16 / (16 // stride)) ** 2 * 3
    result = QianInversion(model).reconstruct(fedsgd_update(model, image, small.labels[2:3]))
    value = float(psnr(result.images, image)[0])
    if holds:
        assert value >= 100 and any("injective" in n for n in result.notes)
    else:
        assert value < 60 and any("fails" in n and "rank deficit" in n for n in result.notes)
        assert any("not exact" in n for n in result.notes)


def test_labels_not_needed_but_threat_model_respected(photos):
    torch.manual_seed(6)
    model = MLP(3 * 32 * 32, hidden=(32,), num_classes=10)
    update = fedsgd_update(model, photos.images[:1], photos.labels[:1], share_labels=True)
    result = QianInversion(model, ThreatModel(labels_known=False)).reconstruct(update)
    assert result.labels is None and result.images.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- perturbed gradients (robust=True)

def _relu_batch_gradient(photos, n, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(3 * 32 * 32, 64).double()
    x = photos.images[:n].double().reshape(n, -1)
    delta = (layer(x) > 0).double() * torch.randn(n, 64, dtype=torch.float64)
    return layer, x, delta.T @ x, delta.sum(0)


def test_noisy_batch_gives_estimates_marked_approximate_that_tighten_with_the_noise(photos):
    layer, x, dW, db = _relu_batch_gradient(photos, 3, 4)
    generator = torch.Generator().manual_seed(0)
    errors = []
    for relative in (1e-4, 1e-2):
        noise = torch.randn(dW.shape, generator=generator, dtype=dW.dtype)
        noisy = dW + relative * dW.abs().mean() * noise
        result = qian_batch_inversion(noisy, db, layer.weight.detach(), layer.bias.detach(), batch_size=3,
                                      robust=True)
        assert result.approximate and result.x.shape[0] == 3
        assert any(n.startswith("APPROXIMATE") for n in result.notes)
        errors.append(float((torch.cdist(result.x, x).min(dim=1).values / x.norm(dim=1).min()).max()))
    assert errors[0] < 1e-4 < errors[1] < 0.05, errors


def test_clean_but_inseparable_batch_is_not_dressed_up_as_an_estimate(photos):
    """Robustness is for perturbed gradients: an exact sigmoid batch still says why it fails."""
    torch.manual_seed(3)
    model = MLP(3 * 32 * 32, hidden=(64,), num_classes=10, activation="sigmoid").double()
    update = fedsgd_update(model, photos.images[:4].double(), photos.labels[:4])
    with pytest.raises(AttackNotApplicable, match="could be separated"):
        QianInversion(model, robust=True).reconstruct(update)


def test_single_noisy_sample_is_the_best_rank_one_fit(faces):
    """B = 1 through Gaussian noise: the robust estimate is fc-bias's rank-one estimate, and far
    better than the one unit the exact method would trust."""
    from gradleak.attacks.analytic import rank_one_estimate
    from gradleak.defenses import defended_updates

    torch.manual_seed(0)
    model = MLP(25 * 25, hidden=(256,), num_classes=2)
    image, label = faces.images[-1:], faces.labels[-1:]
    noisy = defended_updates(model, image, label, defenses=["gaussian:variance=1e-4"])[0].update
    robust = QianInversion(model).reconstruct(noisy)
    plain = QianInversion(model, robust=False).reconstruct(noisy)
    assert any("APPROXIMATE" in n for n in robust.notes), robust.notes
    gradient = noisy.as_gradient()
    expected = rank_one_estimate(gradient["layers.fc1.weight"], gradient["layers.fc1.bias"])
    assert torch.allclose(robust.images.reshape(-1), noisy.data_spec.denormalize(expected.reshape(1, 1, 25, 25)).reshape(-1),
                          atol=1e-4)
    assert float(psnr(robust.images.clamp(0, 1), image)[0]) > float(psnr(plain.images.clamp(0, 1), image)[0]) + 5


def test_a_noisy_batch_is_never_answered_with_not_applicable():
    """Noise on a batch of 8 digits through 64 units: no two rows agree even loosely, and the
    attack still answers with estimates (the strongest units, one each), noted APPROXIMATE."""
    import gradleak as gl
    from gradleak.data import load_dataset
    from gradleak.defenses import defended_updates

    digits = load_dataset("digits", size=16, n=8)
    model = gl.ModelSpec("mlp", {"hidden": "64"}, seed=0).build((1, 16, 16), 10).module
    noisy = defended_updates(model, digits.images, digits.labels, gl.ClientSetup(batch_size=8),
                             ["gaussian:variance=1e-4"])[0].update
    with pytest.raises(AttackNotApplicable, match="could be separated"):
        QianInversion(model, robust=False).reconstruct(noisy)
    result = QianInversion(model).reconstruct(noisy)
    assert result.images.shape[0] == 8 and any("APPROXIMATE" in n for n in result.notes)
