"""Defenses on real photos: each transform does exactly what it says, and composes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

import gradleak as gl
from gradleak.client import ClientSetup
from gradleak.defenses import (DPSGD, GaussianNoise, HalfPrecision, Int8Quantization, LaplacianNoise, LocalTraining,
                               PerExampleClipping, Pruning, RandomMask, SecureAggregation, SignCompression, Soteria,
                               UpdateClipping, defended_updates, epsilon_spent, make_defense, make_defenses,
                               soteria_scores)
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.metrics import psnr
from gradleak.models import LeNet, build_model


@pytest.fixture(scope="module")
def lenet():
    return build_model("lenet", (3, 32, 32), 10, seed=0)


@pytest.fixture(scope="module")
def spec(photos):
    return gl.DataSpec.from_images(photos.images)


def _clean_and_defended(model, photos, spec, defense, n=1, batch=1, **setup):
    images, labels = photos.images[:n], photos.labels[:n]
    clean = defended_updates(model, images, labels, ClientSetup(batch_size=batch, **setup), None, spec=spec)
    defended = defended_updates(model, images, labels, ClientSetup(batch_size=batch, **setup), [defense], spec=spec)
    return clean, defended


def _flat(update):
    return torch.cat([t.reshape(-1) for t in update.tensors.values()])


@pytest.mark.parametrize("defense, variance", [(GaussianNoise(variance=1e-2), 1e-2), (GaussianNoise(std=0.3), 0.09),
                                               (LaplacianNoise(variance=1e-2), 1e-2), (LaplacianNoise(scale=0.2), 0.08)])
def test_noise_has_the_variance_it_is_given(lenet, photos, spec, defense, variance):
    clean, defended = _clean_and_defended(lenet, photos, spec, defense)
    noise = (_flat(defended[0].update) - _flat(clean[0].update)).double()
    assert noise.numel() == 15_826
    assert abs(float(noise.var()) / variance - 1) < 0.05
    assert abs(float(noise.mean())) < 4 * math.sqrt(variance / noise.numel())
    kurtosis = float(((noise - noise.mean()) ** 4).mean() / noise.var() ** 2)
    laplace = isinstance(defense, LaplacianNoise)
    # kurtosis: Laplace 6, Gaussian 3 (the sample kurtosis of 15,826 draws has std ~0.4 and ~0.04)
    assert abs(kurtosis - (6.0 if laplace else 3.0)) < (1.5 if laplace else 0.3)


def test_noise_is_deterministic_per_client_and_differs_between_clients(lenet, photos, spec):
    first = defended_updates(lenet, photos.images[:2], photos.labels[:2], ClientSetup(), ["gaussian:std=0.1"], spec=spec)
    again = defended_updates(lenet, photos.images[:2], photos.labels[:2], ClientSetup(), ["gaussian:std=0.1"], spec=spec)
    clean = defended_updates(lenet, photos.images[:2], photos.labels[:2], ClientSetup(), None, spec=spec)
    assert torch.equal(_flat(first[0].update), _flat(again[0].update))
    noise0 = _flat(first[0].update) - _flat(clean[0].update)
    noise1 = _flat(first[1].update) - _flat(clean[1].update)
    assert abs(float(torch.corrcoef(torch.stack([noise0, noise1]))[0, 1])) < 0.05


def test_update_clipping_bounds_the_norm_and_keeps_the_direction(lenet, photos, spec):
    clean, defended = _clean_and_defended(lenet, photos, spec, UpdateClipping(max_norm=0.5))
    a, b = _flat(clean[0].update).double(), _flat(defended[0].update).double()
    assert float(a.norm()) > 0.5
    assert float(b.norm()) == pytest.approx(0.5, rel=1e-6)
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.7])
def test_pruning_zeroes_exactly_the_smallest_entries_of_each_layer(lenet, photos, spec, ratio):
    clean, defended = _clean_and_defended(lenet, photos, spec, Pruning(ratio=ratio))
    for name, original in clean[0].update.tensors.items():
        pruned = defended[0].update.tensors[name]
        k = int(math.floor(ratio * original.numel()))
        zeroed = pruned == 0
        assert k <= int(zeroed.sum()) <= k + int((original == 0).sum())
        assert torch.equal(pruned[~zeroed], original[~zeroed])
        if k:
            assert float(original[zeroed].abs().max()) <= float(original[~zeroed].abs().min())


def test_global_pruning_uses_one_threshold_for_the_whole_update(lenet, photos, spec):
    clean, defended = _clean_and_defended(lenet, photos, spec, Pruning(ratio=0.5, scope="global"))
    a, b = _flat(clean[0].update), _flat(defended[0].update)
    assert int((b == 0).sum()) == int(math.floor(0.5 * a.numel()))
    assert float(a[b == 0].abs().max()) <= float(a[b != 0].abs().min())


def test_random_mask_drops_the_given_fraction_and_can_rescale(lenet, photos, spec):
    clean, plain = _clean_and_defended(lenet, photos, spec, RandomMask(ratio=0.3))
    _, scaled = _clean_and_defended(lenet, photos, spec, RandomMask(ratio=0.3, rescale=True))
    a, b, c = _flat(clean[0].update), _flat(plain[0].update), _flat(scaled[0].update)
    assert abs(float((b == 0).float().mean()) - 0.3) < 0.02
    kept = b != 0
    assert torch.equal(b[kept], a[kept])
    assert torch.allclose(c[kept], a[kept] / 0.7)


def test_quantisers(lenet, photos, spec):
    clean, half = _clean_and_defended(lenet, photos, spec, HalfPrecision())
    _, int8 = _clean_and_defended(lenet, photos, spec, Int8Quantization())
    _, sign = _clean_and_defended(lenet, photos, spec, SignCompression())
    for name, g in clean[0].update.tensors.items():
        assert torch.equal(half[0].update.tensors[name], g.half().float())
        q = int8[0].update.tensors[name]
        step = g.abs().max() / 127
        assert len(torch.unique(q)) <= 255 and float((q - g).abs().max()) <= float(step) / 2 * (1 + 1e-5)
        s = sign[0].update.tensors[name]
        assert torch.allclose(s.abs(), g.abs().mean().expand_as(s)) and torch.equal(torch.sign(s), torch.sign(g))


def _per_example_clipped_mean(model, images, labels, spec, clip):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, spec.normalize(images), labels)
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: (g * factor.reshape(-1, *[1] * (g.ndim - 1))).mean(0) for n, g in per.items()}


def test_per_example_clipping_through_opacus_equals_clipping_each_example(lenet, photos, spec):
    images, labels = photos.images[:4], photos.labels[:4]
    (served,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=4), [PerExampleClipping(max_norm=0.5)],
                                 spec=spec)
    expected = _per_example_clipped_mean(lenet, images, labels, spec, 0.5)
    for name, value in expected.items():
        assert torch.allclose(served.update.tensors[name], value, atol=1e-6, rtol=1e-5), name
    assert served.privacy["mechanism"] == "per-example-clipping" and served.privacy["epsilon"] == math.inf


def test_dp_sgd_is_calibrated_by_opacus_and_adds_the_right_noise(lenet, photos, spec):
    images, labels = photos.images[:4], photos.labels[:4]
    defense = DPSGD(epsilon=4.0, delta=1e-5, max_grad_norm=1.0, rounds=10)
    (served,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=4), [defense], spec=spec)
    privacy = served.privacy
    assert privacy["epsilon_budget"] == pytest.approx(4.0, abs=0.05)       # the budget over 10 rounds is spent
    assert privacy["epsilon"] < privacy["epsilon_budget"]                  # one update spends less
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], 1.0, 1, 1e-5), rel=1e-9)
    clipped = _per_example_clipped_mean(lenet, images, labels, spec, 1.0)
    noise = torch.cat([(served.update.tensors[n] - clipped[n]).reshape(-1) for n in clipped]).double()
    assert float(noise.std()) == pytest.approx(privacy["noise_multiplier"] * 1.0 / 4, rel=0.05)
    assert served.update.extra["privacy"]["noise_multiplier"] == privacy["noise_multiplier"]


def test_dp_sgd_refuses_batch_norm_naming_opacus_condition(photos, spec):
    model = build_model("convnet", (3, 32, 32), 10, width=8)
    with pytest.raises(ConfigError, match="BatchNorm|batch_norm"):
        defended_updates(model, photos.images[:1], photos.labels[:1], ClientSetup(), ["dp-sgd:epsilon=8"], spec=spec)


def test_secure_aggregation_of_fedsgd_clients_is_the_gradient_of_their_union(lenet, photos, spec):
    images, labels = photos.images[:4], photos.labels[:4]
    served = defended_updates(lenet, images, labels, ClientSetup(batch_size=1), [SecureAggregation(clients=4)], spec=spec)
    (union,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=4), None, spec=spec)
    assert len(served) == 1 and served[0].indices == [0, 1, 2, 3] and served[0].update.batch_size == 4
    for name, value in union.update.tensors.items():
        assert torch.allclose(served[0].update.tensors[name], value, atol=1e-6)
    with pytest.raises(ConfigError, match="clients=3"):
        defended_updates(lenet, images, labels, ClientSetup(batch_size=1), ["secure-aggregation:clients=3"], spec=spec)


def test_local_steps_turn_the_client_into_fedavg(lenet, photos, spec):
    images, labels = photos.images[:2], photos.labels[:2]
    (served,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=2), [LocalTraining(steps=3, lr=0.01)],
                                 spec=spec)
    direct = gl.fedavg_update(lenet, images, labels, lr=0.01, local_steps=3, spec=spec)
    assert served.update.kind == "delta" and served.update.local_steps == 3
    for name, value in direct.tensors.items():
        assert torch.equal(served.update.tensors[name], value)


def test_soteria_scores_match_a_feature_by_feature_backward_pass(photos, spec):
    torch.manual_seed(0)
    model = LeNet(init="default")
    x = spec.normalize(photos.images[1:3])
    scores = soteria_scores(model, "fc", x)
    xr = x.clone().requires_grad_(True)
    r = model.body(xr).flatten(1)
    expected = torch.zeros(r.shape[1])
    for f in range(0, r.shape[1], 97):  # every 97th feature: the loop of the paper's formulation
        (dx,) = torch.autograd.grad(r[:, f].sum(), xr, retain_graph=True)
        expected[f] = (dx.reshape(2, -1).norm(dim=1) / r[:, f].detach().abs()).sum()
        assert float(scores[f]) == pytest.approx(float(expected[f]), rel=1e-4)


def test_soteria_prunes_the_representation_columns_of_the_classifier_only(lenet, photos, spec):
    clean, defended = _clean_and_defended(lenet, photos, spec, Soteria(pruning_rate=0.6))
    for name, g in clean[0].update.tensors.items():
        d = defended[0].update.tensors[name]
        if name == "fc.weight":
            zero_columns = (d == 0).all(dim=0)
            assert int(zero_columns.sum()) == int(0.6 * g.shape[1])
            assert torch.equal(d[:, ~zero_columns], g[:, ~zero_columns])
        else:
            assert torch.equal(d, g), name
    with pytest.raises(ConfigError, match="FedSGD gradient"):
        defended_updates(lenet, photos.images[:1], photos.labels[:1], ClientSetup(), ["local-steps", "soteria"], spec=spec)


def test_specs_parse_and_bad_specs_name_the_problem():
    assert make_defense("gaussian:variance=1e-2") == GaussianNoise(variance=0.01)
    assert make_defense({"name": "pruning", "ratio": 0.3}) == Pruning(ratio=0.3)
    assert make_defense("none") is None and make_defenses(["none", "half"]) == [HalfPrecision()]
    assert make_defense("dp-sgd:epsilon=8").label() == "dp-sgd(epsilon=8)"
    for spec, needle in [("gausian", "unknown defense 'gausian'"), ("gaussian", "exactly one of variance, std"),
                         ("gaussian:variance=1e-2,std=1", "exactly one"), ("pruning:ratio=1.5", "ratio must be in"),
                         ("pruning:rate=0.5", "unknown option 'rate'"), ("dp-sgd:epsilon=-1", "epsilon must be a finite number > 0"),
                         ("half:dtype=int4", "dtype must be one of"), ("secure-aggregation:clients=0", "clients")]:
        with pytest.raises(ConfigError, match=needle):
            make_defense(spec)
    with pytest.raises(ConfigError, match="at most one of dp-sgd"):
        make_defenses(["dp-sgd:epsilon=1", "per-example-clipping"])


def test_registries_refuse_a_taken_name_and_a_defense_without_a_stage():
    """A second class under a registered name would silently change what configs mean."""
    from dataclasses import dataclass

    from gradleak.attacks import register_attack
    from gradleak.defenses import DEFENSES, register_defense

    @dataclass(frozen=True)
    class Impostor(GaussianNoise):
        name = "gaussian"

    with pytest.raises(ConfigError, match="defense name 'gaussian' is taken by GaussianNoise"):
        register_defense(Impostor)
    with pytest.raises(ConfigError, match="attack name 'dlg' is taken by DLG"):
        register_attack(type("OtherDLG", (gl.InvertingGradients,), {"name": "dlg"}))

    @dataclass(frozen=True)
    class Stageless(GaussianNoise):
        name = "stageless"
        stage = "server-room"

    with pytest.raises(ConfigError, match="Stageless: a defense needs a stage in"):
        register_defense(Stageless)
    assert DEFENSES["gaussian"] is GaussianNoise and gl.get_attack("dlg") is gl.DLG and "stageless" not in DEFENSES


def test_the_exact_attack_is_stopped_by_noise_and_aggregation_but_not_by_clipping(photos, spec):
    """fc-bias inversion on a real photo: clipping keeps the rank-one gradient (exact recovery);
    noise breaks exactness, and the robust estimate says it is approximate (and measures what the
    noise leaves); secure aggregation of 2 is refused by its batch size."""
    model = build_model("mlp", (3, 32, 32), 10, seed=0)
    images, labels = photos.images[:2], photos.labels[:2]
    attack = gl.FCBiasInversion(model)
    (clipped, _) = defended_updates(model, images, labels, ClientSetup(), ["clipping:max_norm=0.1"], spec=spec)
    assert float(psnr(attack.reconstruct(clipped.update).images, images[:1])[0]) >= 60
    (noisy, _) = defended_updates(model, images, labels, ClientSetup(), ["gaussian:variance=1e-6"], spec=spec)
    with pytest.raises(AttackNotApplicable, match="not rank one"):
        gl.FCBiasInversion(model, robust=False).reconstruct(noisy.update)
    estimate = attack.reconstruct(noisy.update)
    assert any(note.startswith("APPROXIMATE") for note in estimate.notes)
    assert 10 < float(psnr(estimate.images.clamp(0, 1), images[:1])[0]) < 60
    (summed,) = defended_updates(model, images, labels, ClientSetup(), ["secure-aggregation:clients=2"], spec=spec)
    with pytest.raises(AttackNotApplicable, match="batch of 2"):
        attack.reconstruct(summed.update)


def test_secure_aggregation_decays_qian_batch_recovery_and_scoring_counts_every_image(tmp_path):
    """Qian's exact batch attack on a ReLU MLP: the sum of 8 clients' gradients still gives all 8
    faces back exactly; the sum of 16 gives one. Every original is scored, recovered or not."""
    from gradleak.pipeline import DataRequest, attack_simulated

    runs = {}
    for clients in (8, 16):
        runs[clients] = attack_simulated("qian", tmp_path / str(clients), data=DataRequest("faces", 16, 32), model="mlp",
                                         defenses=[f"secure-aggregation:clients={clients}"], quiet=True)
    for clients, run in runs.items():
        assert run.scores.summary["n_images"] == 16
    exact = {c: sum(row["psnr"] is not None and row["psnr"] >= 60 for row in r.scores.per_image)
             for c, r in runs.items()}
    assert exact == {8: 16, 16: 1}


def test_defended_updates_round_trip_through_update_files(lenet, photos, spec, tmp_path):
    """The defenses and the privacy record travel in the file's JSON header (inf epsilon included)."""
    for defense in ("per-example-clipping", "dp-sgd:epsilon=2", "pruning:ratio=0.5"):
        (served,) = defended_updates(lenet, photos.images[:2], photos.labels[:2], ClientSetup(batch_size=2), [defense],
                                     spec=spec)
        path = gl.save_update(served.update, tmp_path / "u.safetensors")
        loaded = gl.load_update(path, lenet)
        assert loaded.extra["defenses"] == [make_defense(defense).describe()]
        for name, value in served.update.tensors.items():
            assert torch.equal(loaded.tensors[name], value)
    assert loaded.extra.get("privacy") is None


def test_dp_fedavg_clients_sample_clip_and_account_every_local_step(lenet, photos, spec):
    images, labels = photos.images[:8], photos.labels[:8]
    # q = 1 and no noise: the delta is exactly K steps of SGD on the per-example-clipped mean gradient
    (served,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=8),
                                 [LocalTraining(steps=3, lr=0.05), PerExampleClipping(max_norm=0.5)], spec=spec)
    model = build_model("lenet", (3, 32, 32), 10, seed=0)
    for _ in range(3):
        step = _per_example_clipped_mean(model, images, labels, spec, 0.5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= 0.05 * step[name]
    for name, p in model.named_parameters():
        expected = p.detach() - dict(lenet.named_parameters())[name].detach()
        assert torch.allclose(served.update.tensors[name], expected, atol=1e-6), name
    # Poisson-sampled minibatches of expected size 2 out of 8: q = 1/4 per step, 3 steps accounted
    (private,) = defended_updates(lenet, images, labels, ClientSetup(batch_size=8),
                                  [LocalTraining(steps=3, lr=0.05, batch_size=2), DPSGD(epsilon=3.0, rounds=5)], spec=spec)
    privacy = private.privacy
    assert privacy["sample_rate"] == 0.25 and privacy["steps"] == 3 and private.update.local_steps == 3
    assert privacy["epsilon_budget"] == pytest.approx(3.0, abs=0.05)
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], 0.25, 3, 1e-5), rel=1e-9)


def test_soteria_on_relu_features_scores_each_feature_by_the_samples_it_is_active_for(photos, spec):
    model = build_model("mlp", (3, 32, 32), 10, seed=0)          # ReLU: many features are zero for some samples
    images, labels = photos.images[:4], photos.labels[:4]
    x = spec.normalize(images)
    scores = soteria_scores(model, "layers.fc3", x)
    captured = {}
    handle = model.layers.fc3.register_forward_hook(lambda m, args, out: captured.update(r=args[0].detach()))
    model(x)
    handle.remove()
    active = captured["r"] != 0
    assert bool((active.any(0) & ~active.all(0)).any())                     # partly active features exist
    assert bool(torch.isfinite(scores[active.any(0)]).all())                # ... and they are scored, not skipped
    assert bool(torch.isinf(scores[~active.any(0)]).all())                  # zero everywhere: never pruned
    (served,) = defended_updates(model, images, labels, ClientSetup(batch_size=4), ["soteria:layer=layers.fc3"],
                                 spec=spec)
    pruned = (served.update.tensors["layers.fc3.weight"] == 0).all(0) & active.any(0)
    assert int(pruned.sum()) == int(0.6 * scores.numel())
    assert float(scores[pruned].max()) <= float(scores[~pruned & active.any(0)].min())
