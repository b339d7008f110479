"""The zoo: parameter counts from the papers, activation swapping (seed 004), rebuilding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak.models import MODELS, build_model, swap_activations


@pytest.mark.parametrize("name, shape, count", [
    ("lenet", (3, 32, 32), 15_826),             # DLG's LeNet
    ("resnet20", (3, 32, 32), 272_474),         # He et al. 2016: 0.27M
    ("resnet32", (3, 32, 32), 466_906),         # 0.46M
    ("resnet18", (3, 32, 32), 11_173_962),      # ImageNet layout, 3x3 stem, 10 classes
])
def test_parameter_counts(name, shape, count):
    assert sum(p.numel() for p in build_model(name, shape, 10).parameters()) == count


def test_swap_replaces_functional_and_module_relus_and_keeps_names(photos):
    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4 * 30 * 30, 10)

        def forward(self, x):
            return self.fc(F.relu(self.act(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = Inline()
    swapped = swap_activations(model, "sigmoid")
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = photos.images[:2]
    expected = model.fc(torch.sigmoid(torch.sigmoid(model.conv(x))).flatten(1))
    torch.testing.assert_close(swapped(x), expected)
    assert not any(isinstance(m, nn.ReLU) for m in swapped.modules())


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
