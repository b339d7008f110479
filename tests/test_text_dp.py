"""DP-SGD (Opacus) on text models: every example's gradient is its own (position and segment ids
given per example, GPT-2's Conv1D through Opacus's functorch fallback), checked against a loop of
single-example gradients to float64 precision; the update under noise then stops the span attack."""

from __future__ import annotations

import pytest
import torch

from gradleak.client import ClientSetup, fedsgd_update
from gradleak.models import ModelSpec
from gradleak.text import load_text, load_tokenizer
from gradleak.text.pipeline import text_updates

TINY = {"width": 64, "layers": 2, "heads": 2, "positions": 64}


@pytest.mark.parametrize("name", ["gpt2", "bert", "gpt2-classifier"])
def test_clipped_per_example_gradients_are_each_examples_own(name):
    built = ModelSpec(name, TINY, dtype="float64").build((12,), 2)
    data = load_text(n=3, length=12)
    targets = data.ids if built.loss == "causal_lm" else data.labels
    (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=3), ["per-example-clipping:max_norm=1e-3"],
                             load_tokenizer())
    expected = {}
    for i in range(3):        # DP-SGD: the mean of each example's gradient times min(1, C / (norm + 1e-6)) (Opacus)
        one = fedsgd_update(built.module, data.ids[i:i + 1], targets[i:i + 1], loss=built.loss).tensors
        norm = torch.sqrt(sum((g ** 2).sum() for g in one.values()))
        for n, g in one.items():
            expected[n] = expected.get(n, 0) + g * min(1.0, 1e-3 / (float(norm) + 1e-6)) / 3
    total = torch.sqrt(sum(((served.update.tensors[n] - g) ** 2).sum() for n, g in expected.items()))
    assert float(total) < 1e-12 * 1e-3 and set(served.update.tensors) == set(expected)
    assert served.privacy["mechanism"] == "per-example-clipping"


def test_dp_sgd_noise_stops_the_span_attack():
    from gradleak.attacks import SpanAttack
    from gradleak.errors import AttackNotApplicable
    from gradleak.text.metrics import score_text

    built = ModelSpec("gpt2", {**TINY, "width": 96}, dtype="float32").build((12,), 2)
    data = load_text(n=2, length=12)
    (served,) = text_updates(built, data.ids, data.labels, ClientSetup(batch_size=2), ["dp-sgd:noise_multiplier=1"],
                             load_tokenizer())
    assert served.privacy["noise_multiplier"] == 1 and served.privacy["epsilon"] < float("inf")
    try:
        result = SpanAttack(built.module).reconstruct(served.update)
    except AttackNotApplicable:
        return                                      # refused: the noisy span fills the space
    assert score_text(result.tokens, data.ids, load_tokenizer()).summary["token_accuracy"] < 0.5
