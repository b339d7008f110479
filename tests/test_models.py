"""The zoo: parameter counts from the papers, activation swapping (seed 004; softplus for
``smooth_relu``), rebuilding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import ConfigError
from gradleak.models import MODELS, build_model, swap_activations


@pytest.mark.parametrize("name, shape, count", [
    ("lenet", (3, 32, 32), 15_826),             # DLG's LeNet
    ("resnet20", (3, 32, 32), 272_474),         # He et al. 2016: 0.27M
    ("resnet32", (3, 32, 32), 466_906),         # 0.46M
    ("resnet18", (3, 32, 32), 11_173_962),      # ImageNet layout, 3x3 stem, 10 classes
])
def test_parameter_counts(name, shape, count):
    assert sum(p.numel() for p in build_model(name, shape, 10).parameters()) == count


class _Inline(nn.Module):
    """A ReLU module and an ``F.relu`` call: a swap must replace both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 30 * 30, 10)

    def forward(self, x):
        return self.fc(F.relu(self.act(self.conv(x))).flatten(1))


def test_swap_replaces_functional_and_module_relus_and_keeps_names(photos):
    torch.manual_seed(0)
    model = _Inline()
    swapped = swap_activations(model, "sigmoid")
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = photos.images[:2]
    expected = model.fc(torch.sigmoid(torch.sigmoid(model.conv(x))).flatten(1))
    torch.testing.assert_close(swapped(x), expected)
    assert not any(isinstance(m, nn.ReLU) for m in swapped.modules())


def test_softplus_swap_is_the_model_with_smooth_relus(photos):
    torch.manual_seed(0)
    model = _Inline()
    x = photos.images[:2]
    for beta in (1.0, 3.0):
        swapped = swap_activations(model, "softplus", beta=beta)
        expected = model.fc(F.softplus(F.softplus(model.conv(x), beta=beta), beta=beta).flatten(1))
        torch.testing.assert_close(swapped(x), expected)
    sharp = swap_activations(model, "softplus", beta=1e4)   # softplus -> ReLU as beta grows
    assert (sharp(x) - model(x)).abs().max() < 1e-3 < (swapped(x) - model(x)).abs().max()
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(swapped.parameters(), model.parameters()))   # shared, not copied
    assert isinstance(model.act, nn.ReLU)   # the original is untouched


def test_swap_refusals_name_the_condition():
    with pytest.raises(ConfigError, match="beta must be a positive"):
        swap_activations(_Inline(), "softplus", beta=0.0)
    sigmoid = build_model("mlp", (1, 8, 8), 10, activation="sigmoid")
    with pytest.raises(ConfigError, match="has no ReLU"):
        swap_activations(sigmoid, "softplus", beta=3.0, require_relu=True)

    class Branchy(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else x   # data-dependent control flow: fx cannot trace it

    with pytest.raises(ConfigError, match="torch.fx can trace"):
        swap_activations(Branchy(), "softplus", beta=3.0)


@pytest.mark.slow
@pytest.mark.parametrize("name, side", [("tv-densenet121", 224), ("tv-inception_v3", 299)])
def test_torchvision_models_lose_every_relu(name, side):
    model = build_model(name, (3, side, side), 10, activation="sigmoid")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert "functional.relu" not in model.code and "torch.relu" not in model.code  # no functional relu left
    assert model(torch.rand(1, 3, side, side)).shape == (1, 10)


def test_every_zoo_entry_names_its_loss_and_options():
    for name, entry in MODELS.items():
        assert entry.loss in ("cross_entropy", "binary_cross_entropy", "causal_lm"), name
        assert entry.description, name
