"""APRIL's closed form on a ViT: exact in float64 on real photos, refused where it cannot be."""

from __future__ import annotations

import pytest
import torch

from gradleak.attacks import AprilInversion
from gradleak.client import fedsgd_update
from gradleak.data.spec import DataSpec
from gradleak.errors import AttackNotApplicable
from gradleak.metrics import psnr
from gradleak.models import ModelSpec


def vit(width=128, dtype="float64"):
    return ModelSpec("vit", {"width": width, "layers": 1, "heads": 2}, dtype=dtype).build((3, 32, 32), 10)


def test_april_recovers_a_photo_exactly_in_float64(photos):
    built = vit()
    image = photos.images[2:3].to(torch.float64)
    spec = DataSpec.from_images(photos.images.to(torch.float64))
    update = fedsgd_update(built.module, image, photos.labels[2:3], spec=spec)
    result = AprilInversion(built.module).reconstruct(update)
    assert float(psnr(result.images, image)) > 200          # 64 patches <= d = 128: the solve is exact
    two = fedsgd_update(built.module, photos.images[:2].double(), photos.labels[:2], spec=spec)
    with pytest.raises(AttackNotApplicable, match="batch"):
        AprilInversion(built.module).reconstruct(two)
    narrow = vit(width=32)                                    # 64 patches > d = 32
    with pytest.raises(AttackNotApplicable, match="64 patches > width d = 32"):
        AprilInversion(narrow.module).reconstruct(fedsgd_update(narrow.module, image, photos.labels[2:3]))
