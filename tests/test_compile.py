"""``compile=True``: the gradient-matching step through ``torch.compile`` (Inductor) gives the
reconstructions of the eager step, alone and with batched targets, and what cannot run
through the functional path is refused by name before anything compiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import ThreatModel, fedsgd_update
from gradleak.attacks import GradientMatching, get_attack
from gradleak.errors import ConfigError
from gradleak.models import build_model


@pytest.mark.slow
def test_compiled_step_gives_the_eager_reconstructions(photos):
    lenet = build_model("lenet", (3, 32, 32), 10, seed=5)
    updates = [fedsgd_update(lenet, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in range(2)]
    runs = {}
    for compiled in (False, True):
        attack = get_attack("inverting-gradients")(lenet, ThreatModel(), iterations=20, record_every=5,
                                                   compile=compiled)
        runs[compiled] = [attack.reconstruct(updates[0]), *attack.reconstruct_many(updates)]
    for eager, compiled in zip(runs[False], runs[True]):
        assert torch.allclose(eager.images, compiled.images, atol=1e-4)
        assert compiled.history["loss"]["y"] == pytest.approx(eager.history["loss"]["y"], rel=1e-4, abs=1e-6)
    assert "one vmap over 2 targets" in runs[True][-1].notes[-1]
    # the two targets are different images: each slot matched its own update through the compiled graph
    assert float((runs[True][1].images - runs[True][2].images).abs().max()) > 0.1


def _bn_net(training: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 32 * 32, 10))
    return net.train(training)


@pytest.mark.parametrize("build, options, threat, message", [
    (lambda: _bn_net(True), {}, ThreatModel(), "compile=True needs BatchNorm in eval mode .*'1' is in train mode"),
    (lambda: _bn_net(False), {"bn": 1e-2}, ThreatModel(bn_statistics=True),
     r"compile=True cannot run with the BatchNorm-statistics prior \(bn > 0\)"),
    (lambda: build_model("lenet", (3, 32, 32), 10, seed=0), {"optimizer": "lbfgs", "restarts": 2, "group": 0.1},
     ThreatModel(), "compile=True cannot run restarts one by one in lockstep"),
])
def test_what_cannot_compile_is_refused_by_name(photos, build, options, threat, message):
    model = build()
    update = fedsgd_update(model, photos.images[:1], photos.labels[:1])
    with pytest.raises(ConfigError, match=message):
        GradientMatching(model, threat, iterations=2, compile=True, **options).reconstruct(update)


def test_compile_must_be_a_boolean():
    with pytest.raises(ConfigError, match="compile must be"):
        GradientMatching(build_model("lenet", (3, 32, 32), 10, seed=0), compile="yes")
