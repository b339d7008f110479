"""R-GAP: exact recursive recovery on CNN6 / FCN3 under the paper's assumptions; reports where rank fails."""

from __future__ import annotations

import math

import pytest
import torch

from gradleak import DataSpec, ThreatModel, fedsgd_update
from gradleak.attacks._chain import trace_chain
from gradleak.attacks.rgap import RGAP, binary_logit_roots, rank_analysis
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import psnr
from gradleak.models import CNN6, FCN3

FLOORS = {torch.float32: 60.0, torch.float64: 100.0}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
GRANTED = ThreatModel(labels_known=True)


def _attack(model, image, label, dtype, spec, threat=GRANTED, loss="binary_cross_entropy"):
    model = model.to(dtype)
    update = fedsgd_update(model, image.to(dtype), torch.tensor([label]), loss=loss, spec=spec, share_labels=True)
    return RGAP(model, threat).reconstruct(update)


@DTYPES
def test_fcn3_recovers_a_real_digit_exactly(digits, dtype):
    mnist_like = digits.resize(28)
    torch.manual_seed(0)
    image = mnist_like.images[5:6]
    result = _attack(FCN3(28 * 28), image, 1, dtype, DataSpec.from_images(mnist_like.images))
    assert float(psnr(result.images, image.to(dtype))[0]) >= FLOORS[dtype]
    assert any("every layer full rank" in n for n in result.notes)


@DTYPES
def test_small_cnn6_recovers_a_photo_exactly(photos, dtype):
    small = photos.resize(16)
    torch.manual_seed(1)
    model = CNN6(3, 1, 16, widths=(12, 24, 24, 24, 32, 32))
    result = _attack(model, small.images[3:4], 0, dtype, DataSpec.from_images(small.images))
    assert float(psnr(result.images, small.images[3:4].to(dtype))[0]) >= FLOORS[dtype]
    assert result.labels.tolist() == [0]


@pytest.mark.slow
@DTYPES
def test_cnn6_at_32px_exact(photos, dtype):
    torch.manual_seed(2)
    result = _attack(CNN6(), photos.images[7:8], 1, dtype, DataSpec.from_images(photos.images))
    assert float(psnr(result.images, photos.images[7:8].to(dtype))[0]) >= FLOORS[dtype]


def test_multiclass_head_without_bias_infers_label(photos):
    small = photos.resize(16)
    torch.manual_seed(3)
    model = CNN6(3, 10, 16, widths=(12, 24, 24, 24, 32, 32))
    result = _attack(model, small.images[:1], 7, torch.float64, None, threat=ThreatModel(), loss="cross_entropy")
    assert float(psnr(result.images, small.images[:1].double())[0]) >= 100
    assert result.labels.tolist() == [7]


def test_binary_head_needs_the_label(photos):
    small = photos.resize(16)
    torch.manual_seed(4)
    with pytest.raises(AttackNotApplicable) as info:
        _attack(CNN6(3, 1, 16, widths=(4, 4, 4, 4, 4, 4)), small.images[:1], 1, torch.float64, None,
                threat=ThreatModel())
    assert "label known" in info.value.condition


def test_rank_deficient_variant_is_reported(photos):
    small = photos.resize(16)
    torch.manual_seed(5)
    model = CNN6(3, 1, 16, widths=(1, 24, 24, 24, 32, 32)).double()   # 3x16x16 input, 1x9x9 output at layer 1
    params = {n: p.detach() for n, p in model.named_parameters()}
    ranks = rank_analysis(trace_chain(model, (3, 16, 16), params, {}))
    assert ranks[0].ra < 0 and ranks[0].deficit == -ranks[0].ra
    result = _attack(model, small.images[:1], 1, torch.float64, None)
    assert result.config["ranks"][0]["deficit"] > 0
    assert any("rank deficit in 'body.0'" in n for n in result.notes)
    assert float(psnr(result.images, small.images[:1].double())[0]) < 60


def test_batch_refused_and_roots():
    assert len(binary_logit_roots(0.1)) == 1 and len(binary_logit_roots(-0.1)) == 2 and not binary_logit_roots(-1.0)
    for s in (0.3, -0.2):
        for t in binary_logit_roots(s):
            assert abs(-t / (1 + math.exp(t)) - s) < 1e-12


def test_batch_of_two_refused(photos):
    small = photos.resize(16)
    model = CNN6(3, 1, 16, widths=(4, 4, 4, 4, 4, 4))
    update = fedsgd_update(model, small.images[:2], torch.tensor([0, 1]), loss="binary_cross_entropy",
                           share_labels=True)
    with pytest.raises(AttackNotApplicable, match="averages 2"):
        RGAP(model, GRANTED).reconstruct(update)


def test_a_perturbed_gradient_gives_a_best_estimate_not_a_refusal(faces):
    """Noise breaks R-GAP's exactness, not its recursion: the classifier's best rank-one fit
    starts it, every layer is solved in the least-squares sense, and the notes say APPROXIMATE."""
    from gradleak.defenses import defended_updates
    from gradleak.models import MLP

    torch.manual_seed(0)
    model = MLP(25 * 25, hidden=(256,), num_classes=2, activation="leaky_relu")
    image, label = faces.images[-1:], faces.labels[-1:]
    clean = RGAP(model).reconstruct(fedsgd_update(model, image, label))
    assert float(psnr(clean.images.clamp(0, 1), image)[0]) > 100 and not any("APPROX" in n for n in clean.notes)
    noisy = defended_updates(model, image, label, defenses=["gaussian:variance=1e-6"])[0].update
    with pytest.raises(AttackNotApplicable, match="not rank one"):
        RGAP(model, robust=False).reconstruct(noisy)
    estimate = RGAP(model).reconstruct(noisy)
    assert any(n.startswith("APPROXIMATE") for n in estimate.notes)
    assert not any("exact recovery expected" in n for n in estimate.notes)
    assert 30 < float(psnr(estimate.images.clamp(0, 1), image)[0]) < 100
