"""The flat start (``init="flat"`` / ``"randn+flat"``): the scan finds each level exactly on its
grid, a plain image is recovered from its update to float precision, the portfolio keeps the
start that explains the update better, and bad combinations are refused naming the option."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gradleak import DataSpec, fedsgd_update
from gradleak.attacks import GradientMatching, MatchingConfig
from gradleak.attacks._engine import run_group
from gradleak.attacks._flat_start import COARSE, PASSES, flat_start
from gradleak.errors import ConfigError
from gradleak.models import build_model


def _plain(levels: torch.Tensor, side: int = 32) -> torch.Tensor:
    """Uniform images (B, C, side, side) at the given pixel levels (B, C)."""
    return levels[..., None, None].expand(*levels.shape, side, side).clone()


def _level_grid(values: torch.Tensor) -> torch.Tensor:
    return (values * 100).round() / 100


def test_scan_finds_every_image_and_channel_level_on_its_fine_grid():
    """A score whose minimum is a uniform image with a different level per image and channel
    (levels on the 0.01 grid, in a normalised input space): the coordinate pass finds them all,
    within the evaluation count the docstring promises."""
    spec = DataSpec((0.4, 0.5, 0.3), (0.25, 0.2, 0.3))
    truth = torch.tensor([[0.23, 0.71, 0.48], [0.05, 0.96, 0.62]], dtype=torch.float64)
    target = spec.normalize(_plain(truth, 8))
    zeros = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    low, high = (spec.normalize(zeros + v).expand(2, 3, 8, 8) for v in (0, 1))
    calls = []

    def score(x):
        calls.append(1)
        return float((x - target).pow(2).mean())

    x, levels, value = flat_start(score, low, high)
    assert torch.allclose(levels, truth, atol=1e-9)
    assert torch.allclose(x, target, atol=1e-9) and value < 1e-18
    assert len(calls) <= COARSE * (1 + 6 * PASSES) + 11 * 7 * PASSES


def test_plain_image_is_recovered_from_its_update_to_float_precision(photos):
    """The case the flat start exists for: a plain image (here at the per-channel mean levels
    of a real photo, on the 0.01 grid). Its update has matching loss zero at exactly that
    image; the scan finds it and the attack returns it to float precision, where a random
    start does not come near."""
    model = build_model("lenet", (3, 32, 32), 10, seed=0)
    truth = _plain(_level_grid(photos.images[3:4].mean(dim=(-2, -1))))
    update = fedsgd_update(model, truth, photos.labels[3:4])
    flat = GradientMatching(model, iterations=5, init="flat").reconstruct(update)
    assert (flat.images - truth).abs().max() < 1e-5
    assert any("restart 0: flat start at pixel level(s)" in note for note in flat.notes)
    random = GradientMatching(model, iterations=5).reconstruct(update)
    assert (random.images - truth).abs().max() > 0.1


def test_randn_plus_flat_keeps_the_start_with_the_lower_matching_loss(photos):
    """With ``randn+flat`` the last restart starts flat and the others randomly; the attack
    returns the restart that explains the update better: the flat one for a plain image, and
    the random start's own result is the one ``init="randn"`` gives."""
    model = build_model("lenet", (3, 32, 32), 10, seed=0)
    truth = _plain(_level_grid(photos.images[5:6].mean(dim=(-2, -1))))
    update = fedsgd_update(model, truth, photos.labels[5:6])
    both = GradientMatching(model, iterations=20, init="randn+flat", restarts=2, batched_restarts="loop").reconstruct(update)
    assert (both.images - truth).abs().max() < 1e-5
    assert any("best of 2 restart(s): restart 1" in note for note in both.notes)
    assert any("restart 1: flat start" in note for note in both.notes)
    assert not any("restart 0: flat start" in note for note in both.notes)


@pytest.mark.parametrize("options, named", [
    ({"init": "flat", "restarts": 3}, "init='flat' starts every restart at the same image"),
    ({"init": "randn+flat"}, "init='randn+flat' runs random starts and one flat start: it needs restarts >= 2"),
    ({"init": "uniform"}, "init must be one of"),
])
def test_bad_flat_start_options_are_refused_naming_them(options, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        MatchingConfig(**options)


def test_flat_start_of_non_image_candidates_is_refused_before_any_work():
    attack = SimpleNamespace(config=MatchingConfig(init="flat"), _hooks=None)
    with pytest.raises(ConfigError, match=r"init='flat' starts from uniform images: it needs candidates of shape"):
        run_group(attack, None, [0], (2, 5, 8), 10, False, None, None, "cross_entropy")
