"""COPA: layer-wise optimisation recovers a photo through a small CNN; its security measure."""

from __future__ import annotations

import math

import pytest
import torch

from gradleak import DataSpec, ThreatModel, fedsgd_update
from gradleak.attacks._chain import trace_chain
from gradleak.attacks.copa import COPA, copa_security
from gradleak.attacks.rgap import rgap_last_layer
from gradleak.metrics import psnr
from gradleak.models import CNN6


def _setup(photos, widths, dtype=torch.float64, seed=0):
    small = photos.resize(16)
    torch.manual_seed(seed)
    model = CNN6(3, 1, 16, widths=widths).to(dtype)
    image = small.images[4:5].to(dtype)
    update = fedsgd_update(model, image, torch.tensor([1]), loss="binary_cross_entropy",
                           spec=DataSpec.from_images(small.images), share_labels=True)
    return model, image, update


@pytest.mark.parametrize("pullback", [False, True])
def test_copa_recovers_a_photo_exactly(photos, pullback):
    model, image, update = _setup(photos, (12, 24, 24, 24, 32, 32))
    result = COPA(model, ThreatModel(labels_known=True), pullback=pullback).reconstruct(update)
    assert float(psnr(result.images, image)[0]) >= 100
    assert all(curve[-1] < 1e-10 for curve in result.history.values())


def test_copa_float32(photos):
    model, image, update = _setup(photos, (12, 24, 24, 24, 32, 32), torch.float32)
    result = COPA(model, ThreatModel(labels_known=True)).reconstruct(update)
    assert float(psnr(result.images, image)[0]) >= 60


def _security(model, update):
    params = {n: p.detach() for n, p in model.named_parameters()}
    chain = trace_chain(model, (3, 16, 16), params, {})
    last = rgap_last_layer(params["fc.weight"], update.tensors["fc.weight"], None, "binary_cross_entropy", 1)
    return copa_security(chain, params, update.tensors, *last.candidates[0])


def test_security_measure_finite_when_well_posed_infinite_when_deficient(photos):
    model, _, update = _setup(photos, (12, 24, 24, 24, 32, 32))
    secure = _security(model, update)
    assert math.isfinite(secure.measure) and secure.measure > 0 and secure.nullity == 0
    weak, _, update = _setup(photos, (1, 24, 24, 24, 32, 32))
    deficient = _security(weak, update)
    assert deficient.measure == math.inf and deficient.nullity > 0.5
    assert deficient.to_json()["secure"] is True


def test_a_perturbed_gradient_gives_an_estimate_noted_approximate(faces):
    """COPA through noise: started from the classifier's best rank-one fit, not refused."""
    from gradleak.defenses import defended_updates
    from gradleak.errors import AttackNotApplicable
    from gradleak.models import MLP

    torch.manual_seed(0)
    model = MLP(25 * 25, hidden=(64,), num_classes=2, activation="leaky_relu")
    image, label = faces.images[-1:], faces.labels[-1:]
    noisy = defended_updates(model, image, label, defenses=["gaussian:variance=1e-6"])[0].update
    with pytest.raises(AttackNotApplicable, match="not rank one"):
        COPA(model, robust=False).reconstruct(noisy)
    estimate = COPA(model, iterations=300).reconstruct(noisy)
    assert any(n.startswith("APPROXIMATE") for n in estimate.notes)
    assert float(psnr(estimate.images.clamp(0, 1), image)[0]) > 25
