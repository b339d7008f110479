"""The gradient-matching engine and its presets on real photos: each method lowers its
objective and beats a floor on the easy case (LeNet, batch 1). Long runs live in benchmarks/."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import DataSpec, ThreatModel, fedavg_update, fedsgd_update, get_attack
from gradleak.attacks import GradientMatching, MatchingConfig, count_labels
from gradleak.attacks.matching import batch_norm_targets, layer_weights, select_layers, total_variation
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.metrics import label_accuracy, match, psnr
from gradleak.models import build_model


@pytest.fixture(scope="module")
def lenet():
    return build_model("lenet", (3, 32, 32), 10, seed=0)


def _psnr(result, truth):
    return float(psnr(result.images[match(result.images, truth)], truth).mean())


def _psnr_of(images, truth):
    return float(psnr(images[match(images, truth)], truth).mean())


def _losses(result, key="loss"):
    return result.history[key]["y"]


def test_inverting_gradients_lowers_the_cosine_loss_and_beats_a_floor(lenet, photos):
    x, y = photos.images[1:2], photos.labels[1:2]
    update = fedsgd_update(lenet, x, y)
    seen = []
    result = get_attack("inverting-gradients")(lenet, iterations=400, record_every=20).reconstruct(
        update, monitor=lambda images: {"psnr": float(psnr(images, x)[0])}, progress=lambda d, t: seen.append(d))
    losses = _losses(result)
    assert losses[-1] < 0.2 * losses[0]
    assert _psnr(result, x) > 16.0  # random init scores ~6 dB
    assert result.history["psnr"]["y"][-1] > result.history["psnr"]["y"][0] + 8
    assert seen[-1] == 400 and result.labels.tolist() == y.tolist()


def test_dlg_optimises_image_and_soft_label_jointly(lenet, photos):
    x, y = photos.images[2:3], photos.labels[2:3]
    result = get_attack("dlg")(lenet, iterations=25).reconstruct(fedsgd_update(lenet, x, y))
    losses = _losses(result)
    assert losses[-1] < 1e-3 * losses[0]
    assert result.labels.tolist() == y.tolist()  # argmax of the optimised soft label
    assert _psnr(result, x) > 12.0
    assert "soft labels" in result.notes[0]


def test_idlg_label_is_right_for_every_photo(lenet, photos):
    for k in range(len(photos)):
        update = fedsgd_update(lenet, photos.images[k : k + 1], photos.labels[k : k + 1])
        result = get_attack("idlg")(lenet, iterations=1).reconstruct(update)
        assert result.labels.tolist() == [k]


@pytest.mark.parametrize("model_name, options", [("lenet", {"init": "default"}), ("convnet", {}), ("resnet20", {})])
def test_batch_label_counts_are_exact_with_repeated_labels(photos, model_name, options):
    model = build_model(model_name, (3, 32, 32), 10, seed=1, **options)
    spec = DataSpec.from_images(photos.images)
    picks = [0, 3, 3, 7, 7, 7, 1, 9]
    update = fedsgd_update(model, photos.images[picks], photos.labels[picks], spec=spec)
    result = get_attack("inverting-gradients")(model, iterations=1).reconstruct(update)
    assert sorted(result.labels.tolist()) == sorted(picks)
    assert label_accuracy(result.labels, photos.labels[picks]) == 1.0


def test_count_labels_from_weight_rows_when_the_head_has_no_bias():
    probs = torch.full((4,), 0.25)
    counts = torch.tensor([2.0, 0.0, 1.0, 1.0])
    feature = torch.tensor([0.5, 1.0, 0.25])
    rows = (probs - counts / 4)[:, None] * feature[None, :]  # mean over the batch of (p - y) h^T
    labels = count_labels(rows, None, 4, probs, mean_feature_sum=feature.sum())
    assert labels.tolist() == [0, 0, 2, 3]


def test_fedavg_unrolls_local_steps_and_refuses_gradients(photos):
    model = build_model("lenet", (3, 32, 32), 10, seed=2)
    x, y = photos.images[[1, 7]], photos.labels[[1, 7]]
    delta = fedavg_update(model, x, y, lr=0.05, local_steps=2, local_batch_size=1, share_labels=True)
    attack = get_attack("fedavg")(model, ThreatModel(labels_known=True), iterations=150, record_every=10)
    result = attack.reconstruct(delta, monitor=lambda images: {"psnr": _psnr_of(images, x)})
    assert _losses(result)[-1] < 0.3 * _losses(result)[0]
    assert _psnr(result, x) > 8.5  # 150 of the 4,800 iterations; benchmarks/ runs the full budget
    assert result.history["psnr"]["y"][-1] > result.history["psnr"]["y"][0] + 3
    with pytest.raises(AttackNotApplicable, match="use inverting-gradients"):
        attack.reconstruct(fedsgd_update(model, x, y, share_labels=True))


def test_vmapped_restarts_equal_looped_restarts(lenet, photos):
    update = fedsgd_update(lenet, photos.images[:1], photos.labels[:1])
    runs = {mode: GradientMatching(lenet, iterations=30, restarts=3, batched_restarts=mode, tv=1e-2).reconstruct(update)
            for mode in ("vmap", "loop")}
    assert torch.allclose(runs["vmap"].images, runs["loop"].images, atol=1e-4)
    assert "vmap" in " ".join(runs["vmap"].notes) and set(runs["loop"].history) == {"loss[0]", "loss[1]", "loss[2]"}


def test_eval_mode_batch_norm_restarts_run_under_vmap_and_equal_the_loop(photos):
    """Eval-mode BatchNorm is a fixed affine map: restarts batch under vmap (train mode refuses)."""
    model = build_model("convnet", (3, 32, 32), 10, width=4).eval()
    update = fedsgd_update(model, photos.images[:1], photos.labels[:1])
    runs = {mode: GradientMatching(model, iterations=20, restarts=2, batched_restarts=mode, tv=1e-2).reconstruct(update)
            for mode in ("vmap", "loop")}
    assert torch.allclose(runs["vmap"].images, runs["loop"].images, atol=1e-4)
    assert "vmap" in " ".join(runs["vmap"].notes) and "vmap" not in " ".join(runs["loop"].notes)
    train_update = fedsgd_update(model.train(), photos.images[:1], photos.labels[:1])
    with pytest.raises(ConfigError, match="without BatchNorm in train mode"):
        GradientMatching(model, iterations=2, restarts=2, batched_restarts="vmap").reconstruct(train_update)


def test_same_seed_same_result_and_different_seed_differs(lenet, photos):
    update = fedsgd_update(lenet, photos.images[:1], photos.labels[:1])
    a, b, c = (GradientMatching(lenet, iterations=10, seed=s).reconstruct(update).images for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_interrupt_keeps_the_best_iterate(lenet, photos):
    update = fedsgd_update(lenet, photos.images[:1], photos.labels[:1])

    def monitor(images, calls=[]):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return {}

    result = GradientMatching(lenet, iterations=500, record_every=5).reconstruct(update, monitor=monitor)
    assert any("interrupted at iteration 15 of 500" in note for note in result.notes)
    assert result.images is not None and torch.isfinite(result.images).all()
    # Ctrl-C while screening restarts: the best screened iterate, marked interrupted, no restart run on
    calls = []
    screened = GradientMatching(lenet, iterations=500, restarts=3, screen=50, record_every=5,
                                batched_restarts="loop").reconstruct(update, monitor=lambda images: monitor(images, calls))
    assert screened.interrupted and screened.images is not None and torch.isfinite(screened.images).all()
    assert not any("ran to the end" in note for note in screened.notes)


def test_batchnorm_statistics_are_recovered_exactly_from_running_stats(photos):
    model = build_model("convnet", (3, 32, 32), 10, seed=3, dtype=torch.float64)
    x = photos.images[:4].double()
    update = fedsgd_update(model, x, photos.labels[:4])
    before = {n: b for n, b in model.named_buffers()}
    targets = batch_norm_targets(model, before, update.buffers)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: seen.update({n: i[0]}))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()(x)
    for h in hooks:
        h.remove()
    assert set(targets) == set(seen) and len(targets) == 8
    for name, (mean, var) in targets.items():
        torch.testing.assert_close(mean, seen[name].mean((0, 2, 3)), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var, seen[name].var((0, 2, 3), unbiased=True), rtol=1e-9, atol=1e-12)


def test_batchnorm_prior_needs_granted_statistics(photos):
    model = build_model("convnet", (3, 32, 32), 10, seed=3)
    update = fedsgd_update(model, photos.images[:1], photos.labels[:1])
    with pytest.raises(AttackNotApplicable, match="BatchNorm statistics"):
        GradientMatching(model, ThreatModel(), iterations=2, bn=1e-2).reconstruct(update)
    result = GradientMatching(model, ThreatModel(bn_statistics=True), iterations=3, bn=1e-2).reconstruct(update)
    assert len(_losses(result)) >= 1


def test_layer_selection_weights_and_tv():
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    target = {n: torch.full((3,), float(i + 1)) for i, n in enumerate(names)}
    assert select_layers(names, target, "first:2") == ["a.weight", "a.bias"]
    assert select_layers(names, target, "last:1") == ["b.bias"]
    assert select_layers(names, target, "largest:2") == ["b.weight", "b.bias"]
    assert select_layers(names, target, "b.weight,a.weight") == ["a.weight", "b.weight"]
    with pytest.raises(ConfigError, match="not in the update"):
        select_layers(names, target, ["c.weight"])
    assert layer_weights(4, "linear").tolist() == [1.0, 0.75, 0.5, 0.25]
    exp = layer_weights(3, "exp")
    assert exp[0] == 1 and torch.isclose(exp[-1], torch.exp(torch.tensor(-4.0)))
    flat, stripes = torch.ones(1, 1, 4, 4), torch.tensor([[[[0.0, 1.0] * 2] * 4]])
    assert float(total_variation(flat)) == 0.0 and float(total_variation(stripes)) == 1.0


@pytest.mark.parametrize("option, message", [
    (dict(objective="l3"), "objective must be one of"),
    (dict(iterations=0), "iterations must be an integer in 1..10000000, got 0"),
        (dict(restarts=100000), "restarts must be an integer in 1..256"),
        (dict(tv=10**400), "tv must be a finite number"),
    (dict(lr=0.0), "lr must be"),
    (dict(screen=10, restarts=1), "screen=10 picks one of several independent restarts: it needs restarts >= 2"),
    (dict(screen=100, iterations=100, restarts=2), "screen must be an integer in 1..99, got 100"),
    (dict(stepsize=1), "unknown option"),
    (dict(rewind="yes"), "rewind must be true or false, got 'yes'"),
    (dict(rewind=True, schedule="cosine"), "rewind=True goes back .* needs schedule='step'"),
    (dict(rewind=True, optimizer="lbfgs"), "optimizer adam or sgd, got schedule='step', optimizer='lbfgs'"),
])
def test_bad_configuration_is_named(lenet, option, message):
    with pytest.raises(ConfigError, match=message):
        GradientMatching(lenet, **option)


def test_hidden_batch_size_must_be_given(lenet, photos):
    update = fedsgd_update(lenet, photos.images[:2], photos.labels[:2])
    with pytest.raises(ConfigError, match="batch_size=B"):
        GradientMatching(lenet, ThreatModel(batch_size_known=False), iterations=1).reconstruct(update)
    result = GradientMatching(lenet, ThreatModel(batch_size_known=False), iterations=1, batch_size=2).reconstruct(update)
    assert result.images.shape[0] == 2


def test_presets_are_configurations_of_one_engine():
    dlg, ig = get_attack("dlg").preset, get_attack("inverting-gradients").preset
    assert (dlg.objective, dlg.optimizer, dlg.lr, dlg.iterations, dlg.labels) == ("l2", "lbfgs", 1.0, 300, "optimize")
    assert (ig.objective, ig.optimizer, ig.signed, ig.boxed, ig.schedule, ig.iterations) == \
        ("cosine", "adam", "sign", True, "step", 4800)
    assert get_attack("idlg").preset.labels == "infer"
    assert all(issubclass(get_attack(n), GradientMatching) for n in ("dlg", "idlg", "inverting-gradients", "fedavg"))
    assert isinstance(MatchingConfig(), MatchingConfig)


def test_a_time_budget_stops_the_attack_with_a_note(lenet, photos):
    update = fedsgd_update(lenet, photos.images[:1], photos.labels[:1])
    rec = get_attack("inverting-gradients")(lenet, iterations=1_000_000, time_budget=0.2).reconstruct(update)
    note = next(n for n in rec.notes if "time budget" in n)
    assert "time budget of 0.2 s spent" in note and int(note.split("iteration ")[1].split(":")[0]) < 1_000_000
    with pytest.raises(ConfigError, match="time_budget must be a finite number > 0"):
        get_attack("inverting-gradients")(lenet, time_budget=0)


def test_the_cosine_distance_is_one_minus_the_weighted_cosine_over_all_layers(lenet, photos):
    """Geiping et al.'s objective: 1 - <g, g*>_w / (|g|_w |g*|_w) over the layers, with per-layer
    weights w; checked against the layer-by-layer sums on two real gradients."""
    from gradleak.attacks.matching import gradient_distance

    first = fedsgd_update(lenet, photos.images[:1], photos.labels[:1]).tensors
    second = fedsgd_update(lenet, photos.images[1:2], photos.labels[1:2]).tensors
    names = list(first)
    for weights in (torch.ones(len(names)), torch.linspace(1.0, 0.1, len(names))):
        a = {n: first[n].double() for n in names}
        b = {n: second[n].double() for n in names}
        dot = sum(w * (a[n] * b[n]).sum() for n, w in zip(names, weights.double()))
        norms = [sum(w * (t[n] ** 2).sum() for n, w in zip(names, weights.double())).sqrt() for t in (a, b)]
        expected = float(1 - dot / (norms[0] * norms[1]))
        assert float(gradient_distance(a, b, names, weights.double(), "cosine")) == pytest.approx(expected, abs=1e-12)
        assert float(gradient_distance(a, a, names, weights.double(), "cosine")) == pytest.approx(0.0, abs=1e-12)
        assert 0.05 < expected < 1.95  # two different images: neither parallel nor opposite


@pytest.mark.parametrize("objective", ["cosine", "layer-cosine"])
def test_cosine_distance_stays_in_range_for_a_confident_candidates_tiny_gradient(lenet, photos, objective):
    """A candidate the network classifies with near certainty has a gradient ~1e-25 per entry:
    its squared norm underflows in float32 while its dot product with the observed gradient does
    not. The distance must still be that of the direction (0 for a parallel gradient, the same
    value as at full scale otherwise), never outside [0, 2] (-95 was once recorded)."""
    from gradleak.attacks.matching import gradient_distance

    first = fedsgd_update(lenet, photos.images[:1], photos.labels[:1]).tensors
    second = fedsgd_update(lenet, photos.images[1:2], photos.labels[1:2]).tensors
    names, weights = list(first), torch.ones(len(first))
    for scale in (1e-25, 1e-40):
        tiny = {n: first[n] * scale for n in names}
        assert float(gradient_distance(tiny, first, names, weights, objective)) == pytest.approx(0.0, abs=1e-5)
        full = float(gradient_distance(second, first, names, weights, objective))
        small = float(gradient_distance({n: second[n] * scale for n in names}, first, names, weights, objective))
        assert small == pytest.approx(full, abs=1e-5) and 0.0 < small < 2.0


def test_observed_output_gradient_reproduces_the_update_exactly_at_the_true_image(photos):
    """output_gradient='observed': the candidate's gradient is J(x')^T delta with delta the
    classifier's bias gradient, so at the client's image it is the client's gradient itself."""
    model = build_model("convnet", (3, 32, 32), 10, width=4).double().eval()
    with torch.no_grad():   # a confident network, as training leaves it: softmax close to one-hot
        model.fc.weight.mul_(40)
    x, y = photos.images[3:4].double(), photos.labels[3:4]
    update = fedsgd_update(model, x, y)
    attack = GradientMatching(model, ThreatModel(), output_gradient="observed", tv=0.0, iterations=1)
    problem = attack._problem(update)
    assert problem.data["output_gradient"].shape == (10,) and "output gradient observed" in problem.label_note
    assert float(problem.objective(x, None, functional=False).detach()) < 1e-12
    assert float(problem.objective(photos.images[4:5].double(), None, functional=False).detach()) > 1e-6
    # the gradient it matches is the client's: J(x)^T delta with delta = softmax - onehot
    from gradleak.attacks.matching import output_functional

    simulated = torch.func.grad(output_functional(model, dict(model.named_buffers()), x, problem.data["output_gradient"]))(
        {n: p.detach() for n, p in model.named_parameters()})
    assert max(float((simulated[n] - update.tensors[n]).abs().max()) for n in simulated) < 1e-12


def test_observed_output_gradient_refuses_batches_and_deltas_and_auto_falls_back(lenet, photos):
    batch = fedsgd_update(lenet, photos.images[:2], photos.labels[:2])
    with pytest.raises(AttackNotApplicable, match="the batch holds 2 images"):
        GradientMatching(lenet, output_gradient="observed", iterations=1).reconstruct(batch)
    delta = fedavg_update(lenet, photos.images[:1], photos.labels[:1], lr=0.1, local_steps=2)
    with pytest.raises(AttackNotApplicable, match="not a gradient"):
        get_attack("fedavg")(lenet, output_gradient="observed", iterations=1).reconstruct(delta)
    auto = GradientMatching(lenet, output_gradient="auto", iterations=2).reconstruct(batch)
    assert not any("output gradient observed" in note for note in auto.notes)


def test_observed_output_gradient_travels_with_batched_targets(lenet, photos):
    updates = [fedsgd_update(lenet, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in (5, 6)]
    attack = get_attack("inverting-gradients")(lenet, output_gradient="observed", iterations=15)
    together = list(attack.reconstruct_many(updates))
    alone = [attack.reconstruct(u) for u in updates]
    assert "attacked together" in together[0].notes[-1]
    for a, b in zip(together, alone):
        assert torch.allclose(a.images, b.images, atol=1e-4)


def test_screening_runs_on_the_restart_with_the_lowest_early_loss_along_its_own_trajectory(lenet, photos):
    """screen=k: the restart whose loss was lowest within the first k iterations (of the full
    schedule, all restarts run to the end for comparison) is the one kept, and it ends where that
    restart ends when every restart runs to the end (same start, same trajectory)."""
    update = fedsgd_update(lenet, photos.images[2:3], photos.labels[2:3])
    options = dict(iterations=60, restarts=3, tv=1e-2, record_every=1, batched_restarts="loop")
    full = GradientMatching(lenet, **options).reconstruct(update)
    screened = GradientMatching(lenet, screen=15, **options).reconstruct(update)
    early = {r: min(full.history[f"loss[{r}]"]["y"][:15]) for r in range(3)}
    chosen = min(early, key=early.__getitem__)
    assert f"restart {chosen} ran to the end" in " ".join(screened.notes)
    assert f"restart {chosen} (the lowest loss of 3 after 15 iterations)" in " ".join(screened.notes)
    assert set(screened.history) == {f"loss[{chosen}]"}
    assert screened.history[f"loss[{chosen}]"]["y"] == full.history[f"loss[{chosen}]"]["y"]
    assert len({round(min(v["y"]), 6) for v in full.history.values()}) == 3   # the restarts differ


@pytest.mark.parametrize("restarts", [1, 2])
def test_rewind_resumes_each_decay_from_the_best_iterate_so_far(lenet, photos, restarts):
    """rewind=True: after each decay of the step schedule (iterations 15, 25, 35 of 40) every restart's
    candidate is its best iterate so far, so the loss recorded there is that iterate's loss; without it
    the candidate goes on from where the long step left it."""
    update = fedsgd_update(lenet, photos.images[2:3], photos.labels[2:3])
    options = dict(iterations=40, restarts=restarts, tv=1e-2, record_every=1, lr=0.3)
    rewound = GradientMatching(lenet, rewind=True, **options).reconstruct(update)
    plain = GradientMatching(lenet, **options).reconstruct(update)
    keys = ["loss"] if restarts == 1 else [f"loss[{r}]" for r in range(restarts)]
    for key in keys:
        losses, free = _losses(rewound, key), _losses(plain, key)
        assert losses[:15] == free[:15]   # the same trajectory up to the first decay
        for milestone in (15, 25, 35):
            assert losses[milestone] == pytest.approx(min(losses[:milestone]), rel=1e-6, abs=1e-9)
        assert free[15] != pytest.approx(min(free[:15]), rel=1e-6, abs=1e-9)
    group = list(range(restarts))
    assert f"rewind: restarts {group} went back to their best iterate after the learning-rate decay(s) at " \
           "iteration(s) 15, 25, 35" in rewound.notes
    assert not any(note.startswith("rewind") for note in plain.notes)


def _objective_value(model, update, x, **options):
    problem = GradientMatching(model, ThreatModel(), tv=0.0, iterations=1, **options)._problem(update)
    return float(problem.objective(x, None, functional=False).detach())


def _confident_linear_classifier(x, y, margin):
    model = nn.Linear(x.shape[1], 10)
    with torch.no_grad():   # the true class's logit ahead of every other by `margin`
        z = model(x)
        model.bias[y] += margin + (z.max() - z[0, y])
    return model


@pytest.mark.parametrize("margin", [0.0, 86.0])
def test_loss_scaled_to_one_is_an_exact_power_of_two_that_keeps_gradients_normal(photos, margin):
    """The engine multiplies the candidate's loss by the power of two that brings it into [1, 2)
    (2^23 where float32 rounds it to 0): bit for bit the gradient times that power, so a cosine
    matches the same direction; at a logit margin of 86 the float32 gradient of a photo
    (entries ~4e-38 x pixel) is mostly subnormal (slow on CPUs) and with the factor none is."""
    from torch.func import functional_call, grad

    from gradleak.attacks.optimization import loss_scaled_to_one

    x, y = photos.images[3:4].flatten(1), photos.labels[3:4]
    model = _confident_linear_classifier(x, y, margin)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    value, scaled_value = float(loss(params)), float(loss_scaled_to_one(loss)(params))
    plain, scaled = grad(loss)(params)["weight"], grad(loss_scaled_to_one(loss))(params)["weight"]
    factor = 2.0 ** 23 if value < torch.finfo(torch.float32).eps else scaled_value / value
    assert factor == 2.0 ** round(torch.log2(torch.tensor(factor)).item())
    subnormal = [int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in (plain, scaled)]
    if margin == 0.0:
        assert 1.0 <= scaled_value < 2.0 and torch.equal(scaled, plain * factor) and subnormal == [0, 0]
    else:
        assert value == 0.0 and subnormal[0] > plain.numel() // 4 and subnormal[1] == 0
        truth = grad(lambda p: nn.functional.cross_entropy(functional_call(model.double(), p, (x.double(),)), y))(
            {n: p.double() for n, p in params.items()})["weight"]
        nonzero = truth != 0
        assert float(((scaled.double() / factor - truth)[nonzero] / truth[nonzero]).abs().max()) < 1e-4


def test_the_loss_scaling_leaves_scale_dependent_objectives_alone(lenet, photos):
    """l2 compares magnitudes: its candidate gradient is the client's loss's, unscaled, so the
    objective at another image is the squared distance of the two updates."""
    from gradleak.attacks.matching import gradient_distance

    # the candidate is scored with the label inferred from the observed update: image 0's
    first, second = fedsgd_update(lenet, photos.images[:1], photos.labels[:1]), fedsgd_update(
        lenet, photos.images[1:2], photos.labels[:1])
    value = _objective_value(lenet, first, photos.images[1:2], objective="l2")
    names = list(first.tensors)
    expected = float(gradient_distance(second.tensors, first.tensors, names, torch.ones(len(names)), "l2"))
    assert value == pytest.approx(expected, rel=1e-4) and expected > 1e-6
