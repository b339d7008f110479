"""GradInversion (Yin et al. 2021) in the one gradient-matching engine: the group-consistency
term, its options, batch label recovery, and the attack's refusals, on the built-in photos.
The PSNR comparison with Inverting Gradients on ResNets lives in benchmarks/gradinversion.py."""

from __future__ import annotations

import pytest
import torch

from gradleak import DataSpec, ThreatModel, fedsgd_update, get_attack
from gradleak.attacks import GradInversion, MatchingConfig, distinct_labels
from gradleak.attacks._engine import group_weight
from gradleak.attacks.matching import consensus, group_consistency
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.models import build_model

GRANTED = ThreatModel(bn_statistics=True)


@pytest.fixture(scope="module")
def small_bn():
    """A small train-mode BatchNorm network (ConvNet width 8 with BatchNorm), 10 classes."""
    return build_model("convnet", (3, 32, 32), 10, seed=0, width=8)


def _restarts(photos, *orders):
    """A group of restarts made of real photos: one batch of 4 per order of the photos."""
    return torch.stack([photos.images[list(order)] for order in orders])


# ---------------------------------------------------------------- the regulariser's math
def test_group_consistency_is_zero_when_the_restarts_agree(photos):
    X = _restarts(photos, (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
    assert float(group_consistency(X).max()) < 1e-12  # zero up to the rounding of the mean
    assert torch.allclose(consensus(X), photos.images[:4], atol=1e-7)


def test_group_consistency_is_each_restarts_mean_squared_distance_to_the_pixel_mean(photos):
    X = _restarts(photos, (0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 8, 9))
    mean = X.mean(0)
    expected = torch.stack([((X[r] - mean) ** 2).mean() for r in range(3)])
    assert torch.allclose(group_consistency(X), expected)
    assert bool((group_consistency(X) > 0).all())


def test_group_consistency_gradient_pulls_each_restart_towards_the_consensus(photos):
    X = _restarts(photos, (0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 8, 9)).requires_grad_(True)
    (gradient,) = torch.autograd.grad(group_consistency(X).sum(), X)
    mean = X.detach().mean(0)
    per_restart = X[0].numel()
    assert torch.allclose(gradient, 2 * (X.detach() - mean) / per_restart, atol=1e-9)
    # a small step down the gradient brings every restart closer to the (old) consensus
    stepped = X.detach() - 0.1 * per_restart * gradient
    for r in range(3):
        assert float((stepped[r] - mean).norm()) < float((X[r].detach() - mean).norm())


def test_group_weight_schedules():
    constant = MatchingConfig(group=0.5, group_start=0.25, restarts=2, iterations=100)
    assert [group_weight(constant, i) for i in (0, 24, 25, 99)] == [0.0, 0.0, 0.5, 0.5]
    linear = MatchingConfig(group=0.5, group_start=0.5, group_schedule="linear", restarts=2, iterations=100)
    ramp = [group_weight(linear, i) for i in range(100)]
    assert ramp[49] == 0.0 and 0 < ramp[50] < ramp[75] < ramp[99] == pytest.approx(0.5)


@pytest.mark.parametrize("options, words", [
    ({"group": 0.1, "restarts": 1}, "group=0.1 needs restarts >= 2"),
    ({"group": -1.0, "restarts": 2}, "group"),
    ({"group_start": 1.0}, "group_start must be a fraction"),
    ({"group_start": -0.1}, "group_start"),
    ({"group_schedule": "cubic"}, "group_schedule must be one of"),
    ({"labels": "yin"}, "labels must be one of"),
])
def test_option_errors_are_one_line_and_name_the_option(options, words):
    with pytest.raises(ConfigError) as error:
        MatchingConfig(**options)
    assert words in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------- labels
def test_distinct_labels_recover_a_batch_of_eight_exactly_on_resnet20(photos):
    model = build_model("resnet20", (3, 32, 32), 10, seed=1)
    picks = [7, 2, 9, 0, 4, 6, 1, 5]
    update = fedsgd_update(model, photos.images[picks], photos.labels[picks])
    weight = next(t for n, t in update.tensors.items() if t.ndim == 2 and t.shape[0] == 10)
    assert distinct_labels(weight, 8).tolist() == sorted(photos.labels[picks].tolist())
    # through the attack: Yin et al.'s rule (labels='distinct') and the preset's counting rule agree
    for rule in ("distinct", "infer"):
        found = GradInversion(model, GRANTED, labels=rule, iterations=1, restarts=2).reconstruct(update).labels
        assert found.tolist() == sorted(picks), rule


def test_distinct_labels_refuse_more_samples_than_classes(photos):
    with pytest.raises(AttackNotApplicable, match="batch size <= number of classes|cannot have distinct labels"):
        distinct_labels(torch.zeros(10, 64), 12)


# ---------------------------------------------------------------------- the attack
def test_gradinversion_refuses_without_batchnorm_statistics(small_bn, photos):
    update = fedsgd_update(small_bn, photos.images[:4], photos.labels[:4])
    with pytest.raises(AttackNotApplicable) as error:
        GradInversion(small_bn, ThreatModel(), iterations=1).reconstruct(update)
    assert "bn_statistics" in error.value.condition
    lenet = build_model("lenet", (3, 32, 32), 10, seed=0)
    with pytest.raises(AttackNotApplicable, match="no BatchNorm"):
        GradInversion(lenet, GRANTED, iterations=1).reconstruct(fedsgd_update(lenet, photos.images[:4], photos.labels[:4]))
    assert get_attack("gradinversion") is GradInversion


def test_group_of_restarts_in_lockstep_equals_separate_restarts_until_the_term_starts(small_bn, photos):
    """The loop evaluator runs each restart as alone; the group term only adds its pull."""
    spec = DataSpec.from_images(photos.images)
    update = fedsgd_update(small_bn, photos.images[:4], photos.labels[:4], spec=spec)
    options = dict(iterations=6, restarts=2, bn=0.1, record_every=1)
    apart = GradInversion(small_bn, GRANTED, group=0.0, **options).reconstruct(update)
    late = GradInversion(small_bn, GRANTED, group=1.0, group_start=0.99, **options).reconstruct(update)
    pulled = GradInversion(small_bn, GRANTED, group=1.0, **options).reconstruct(update)
    for r in (0, 1):
        assert apart.history[f"loss[{r}]"]["y"] == pytest.approx(late.history[f"loss[{r}]"]["y"], rel=1e-5)
    assert pulled.history["loss[0]"]["y"][-1] != pytest.approx(apart.history["loss[0]"]["y"][-1], rel=1e-5)
    assert any("group consistency over 2 restarts" in note for note in pulled.notes)
    assert pulled.labels.tolist() == [0, 1, 2, 3]
    assert pulled.images.shape == (4, 3, 32, 32)


def test_group_consistency_runs_batched_under_vmap_for_models_without_batchnorm(photos):
    lenet = build_model("lenet", (3, 32, 32), 10, seed=0)
    update = fedsgd_update(lenet, photos.images[:2], photos.labels[:2])
    options = dict(tv=1e-2, iterations=4, restarts=3, record_every=1)
    pulled = get_attack("gradient-matching")(lenet, group=1.0, **options).reconstruct(update)
    apart = get_attack("gradient-matching")(lenet, **options).reconstruct(update)
    note = next(note for note in pulled.notes if "group consistency" in note)
    assert "over 3 restarts" in note and "batched with vmap" in note and "consensus" in note
    assert pulled.history["loss[0]"]["y"][0] == pytest.approx(apart.history["loss[0]"]["y"][0], rel=1e-6)  # same start
    assert pulled.history["loss[0]"]["y"][-1] != pytest.approx(apart.history["loss[0]"]["y"][-1], rel=1e-6)
