"""ReLU smoothing by continuation (``smooth_relu``): pass 2 starts exactly where pass 1 ended
and never returns a worse exact matching loss than that start, Ctrl-C in pass 1 keeps its
result, and bad options are refused naming them. The softplus stand-in itself
(``swap_activations(..., "softplus")``) is tested in tests/test_models.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gradleak import fedsgd_update
from gradleak.attacks import InvertingGradients, MatchingConfig
from gradleak.errors import ConfigError
from gradleak.models import build_model, swap_activations


def test_config_refuses_a_bad_beta_and_optimised_labels():
    with pytest.raises(ConfigError, match="smooth_relu"):
        MatchingConfig(smooth_relu=-1.0)
    with pytest.raises(ConfigError, match="soft labels"):
        MatchingConfig(smooth_relu=3.0, labels="optimize")


def _case(photos):
    model = build_model("convnet", (3, 32, 32), 10, seed=0, width=4).eval()
    return model, fedsgd_update(model, photos.images[5:6], photos.labels[5:6])


def test_pass_two_starts_at_pass_one_and_never_ends_worse(photos):
    """Pass 1 is the configured attack on the softplus model (rerun here on its own: the same
    images); pass 2's first recorded loss is the exact loss of those images, and the returned
    images' exact loss is not above it. The exact loss keeps its name; pass 1's is 'smooth loss'."""
    model, update = _case(photos)
    cfg = replace(InvertingGradients.preset, iterations=30, record_every=5)
    result = InvertingGradients(model, config=replace(cfg, smooth_relu=3.0)).reconstruct(update)
    smooth = swap_activations(model, "softplus", beta=3.0)
    pass_one = InvertingGradients(smooth, config=cfg).reconstruct(update).images
    problem = InvertingGradients(model, config=cfg)._problem(update)
    start = float(problem.objective(problem.spec.normalize(pass_one), None, functional=False).detach())   # matching + TV
    loss = result.history["loss"]
    assert loss["x"][0] == cfg.iterations
    assert loss["y"][0] == pytest.approx(start, rel=1e-4)   # the exact objective at pass 1's images
    assert min(loss["y"]) <= loss["y"][0]
    assert result.history["smooth loss"]["x"][-1] < cfg.iterations
    assert not torch.equal(result.images, pass_one)                # pass 2 moved
    assert any(note.startswith("pass 2 (the exact model") for note in result.notes)
    assert sum("label from" in note for note in result.notes) == 1   # pass 2's repeated label note shown once


def test_ctrl_c_in_pass_one_keeps_its_best_iterate(photos):
    model, update = _case(photos)
    calls = []

    def monitor(images):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {}

    result = InvertingGradients(model, iterations=40, record_every=5, smooth_relu=3.0).reconstruct(update, monitor=monitor)
    assert result.interrupted and "loss" not in result.history and "smooth loss" in result.history
    assert result.images.shape == (1, 3, 32, 32) and torch.isfinite(result.images).all()
