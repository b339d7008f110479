"""LAMP (Balunović et al. 2022) on a tiny BERT classifier (width 64, 2 layers) and real held-out
text: its transformations, its discrete step, its alternation with the engine's continuous
steps, and its options."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gradleak.attacks import LAMP
from gradleak.attacks._lamp_search import TRANSFORMATIONS, choose_start, discrete_step, transformation
from gradleak.attacks.text_matching import nearest_tokens
from gradleak.client import fedsgd_update
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.models import ModelSpec
from gradleak.text import load_text

SMALL = {"width": 64, "layers": 2, "heads": 2, "positions": 64}


def bert(length=10, **options):
    return ModelSpec("bert", {**SMALL, **options}, dtype="float32").build((length,), 2)


def update_of(built, data):
    return fedsgd_update(built.module, data.ids, data.labels, loss=built.loss, model_info=built.description())


def scorer(attack, update, with_prior=True):
    """LAMP's discrete-step score on ``update`` (the matching loss + lm_weight x the prior's NLL),
    built the way a run builds it."""
    view, tensors, names = attack._prepare(update)
    attack._begin(view, tensors, update)
    attack.config = replace(attack.config, layers=names)
    problem = attack._problem(replace(update, input_shape=(update.input_shape[0], view.width), data_spec=None))
    return attack._score(problem.objective, None, None, with_prior), view, tensors


def test_transformations_are_permutations_that_move_something():
    generator = torch.Generator().manual_seed(0)
    for n in range(2, 8):
        for kind in TRANSFORMATIONS:
            for _ in range(30):
                perm = transformation(kind, n, generator)
                assert sorted(perm.tolist()) == list(range(n)), (kind, perm)
                assert perm.tolist() != list(range(n)), (kind, n)
    assert transformation("move-prefix", 5, generator).tolist() in ([k % 5 for k in range(i, i + 5)] for i in range(1, 5))


def test_discrete_step_never_raises_its_score_and_undoes_a_swap():
    built = bert()
    data = load_text(n=2, length=10)
    update = update_of(built, data)
    attack = LAMP(built.module, lm_weight=0.2)
    score, view, tensors = scorer(attack, update)
    table = tensors[view.embedding_name]
    truth = table[data.ids].detach()                                   # (2, 10, d): the client's embeddings
    generator = torch.Generator().manual_seed(1)
    for trial in range(2):                                             # random embeddings: never worse
        x = torch.randn(truth.shape, generator=generator) * table.norm(dim=1).mean() / truth.shape[-1] ** 0.5
        out, outcome = discrete_step(score, x, 12, generator)
        assert outcome.before == pytest.approx(score(x)) and outcome.after == pytest.approx(score(out))
        assert outcome.after <= outcome.before
        assert sorted(out.flatten().tolist()) == sorted(x.flatten().tolist())    # a reordering, nothing else
    swapped = truth.clone()
    swapped[0, [2, 6]] = truth[0, [6, 2]]                              # two tokens of the first sequence swapped
    attack.lm_weight = 0.0                                             # the gradient alone knows the order
    out, outcome = discrete_step(score, swapped, 200, torch.Generator().manual_seed(2))
    assert outcome.after < outcome.before and outcome.after == pytest.approx(0.0, abs=1e-5)
    assert nearest_tokens(view, tensors, out).tolist() == data.ids.tolist()


def test_alternation_changes_the_trajectory_from_the_first_discrete_step_on():
    built = bert()
    data = load_text(n=1, length=10)
    update = update_of(built, data)
    options = {"iterations": 40, "record_every": 1, "proposals": 8, "init_candidates": 3, "lr": 0.05}

    class Plain(LAMP):                       # the engine without the discrete hook
        candidate_step = None

    alternating = LAMP(built.module, discrete_every=15, **options).reconstruct(update)
    continuous = LAMP(built.module, discrete_every=0, **options).reconstruct(update)
    plain = Plain(built.module, discrete_every=15, **options).reconstruct(update)
    assert continuous.history == plain.history and continuous.tokens.tolist() == plain.tokens.tolist()
    a, c = alternating.history["loss"]["y"], continuous.history["loss"]["y"]
    assert a[:15] == c[:15]                  # the same start and the same continuous steps up to the first
    assert a[15] != c[15]                    # discrete step (after iteration 15), then another trajectory
    note = next(n for n in alternating.notes if n.startswith("discrete steps: 2 "))   # after 15 and 30
    assert "kept 0 " not in note
    assert not any(n.startswith("discrete steps") for n in continuous.notes)


def test_lamp_options_are_refused_in_one_line():
    model = bert().module
    for options, words in (({"discrete_every": -1}, "discrete_every must be an integer in 0.."),
                           ({"proposals": 0}, "proposals must be an integer in 1.."),
                           ({"init_candidates": 10**9}, "init_candidates must be an integer in 1..100000"),
                           ({"lm_weight": -0.5}, "lm_weight must be a finite number >= 0"),
                           ({"norm_weight": float("nan")}, "norm_weight must be a finite number"),
                           ({"swaps": 50}, "unknown option(s) ['swaps']")):
        with pytest.raises(ConfigError) as error:
            LAMP(model, **options)
        assert words in str(error.value) and "\n" not in str(error.value)
    assert LAMP(model, objective="l2+l1").options()["lm_weight"] == 60.0      # LAMP_L1L2's weights
    small = bert(vocab=500)
    data = load_text(n=1, length=10)
    data_ids = data.ids % 500
    update = fedsgd_update(small.module, data_ids, data.labels, loss=small.loss, model_info=small.description())
    with pytest.raises(AttackNotApplicable, match="3223-token vocabulary") as error:
        LAMP(small.module, iterations=2, init_candidates=1).reconstruct(update)
    assert "\n" not in str(error.value)


def test_the_exponential_schedule_ends_at_a_hundredth_of_the_rate():
    from gradleak.attacks._steps import _scheduler
    from gradleak.attacks.optimization import MatchingConfig

    x = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.01)
    scheduler = _scheduler(MatchingConfig(schedule="exponential", iterations=200), optimizer)
    rates = []
    for _ in range(200):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[99] == pytest.approx(0.001, rel=1e-6) and rates[-1] == pytest.approx(1e-4, rel=1e-6)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        MatchingConfig(schedule="exp")


def test_the_start_is_the_lowest_scored_of_the_random_embeddings_at_the_table_norm():
    built = bert()
    data = load_text(n=1, length=10)
    attack = LAMP(built.module)
    score, view, tensors = scorer(attack, update_of(built, data), with_prior=False)
    norm = tensors[view.embedding_name].norm(dim=1).mean()
    def scale(x):
        return torch.nn.functional.normalize(x, dim=-1) * norm
    first = torch.randn(1, 10, view.width, generator=torch.Generator().manual_seed(3))
    start, value = choose_start(score, first, 12, torch.Generator().manual_seed(4), scale)
    assert value == pytest.approx(score(start))
    generator = torch.Generator().manual_seed(4)   # the 11 draws after the first, as choose_start made them
    draws = [scale(first)] + [scale(torch.randn(first.shape, generator=generator)) for _ in range(11)]
    assert value <= min(score(d) for d in draws)   # the lowest of the 12, or an order of it lower still
    assert torch.allclose(start.norm(dim=-1), norm.expand(1, 10))
