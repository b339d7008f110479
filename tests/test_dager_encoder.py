"""The span attack (DAGER) on encoders at batch B > 1: whole sequences searched over the tokens
block 0 finds at each position and confirmed by block 1's span (attacks/_dager_encoder.py).
Small BERT classifiers in float64, held-out sequences of the built-in corpus."""

from __future__ import annotations

import pytest
import torch

from gradleak.client import fedsgd_update
from gradleak.models import ModelSpec
from gradleak.text import load_text


def bert_update(layers: int, batch: int, length: int):
    built = ModelSpec("bert", {"width": 128, "layers": layers, "heads": 2, "positions": 64},
                      dtype="float64").build((length,), 2)
    data = load_text(n=batch, length=length)
    update = fedsgd_update(built.module, data.ids, data.labels, loss=built.loss, model_info=built.description())
    return built, data, update


def rows_of(tokens: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in tokens.tolist()}


@pytest.mark.parametrize("layers, batch, length", [(3, 2, 16), (3, 4, 8), (2, 4, 8)])
def test_encoder_batches_are_assembled_exactly(layers, batch, length):
    """Every sequence of the batch comes back, token for token (2 layers: block 1 is the last, only
    position 0 is tested there)."""
    from gradleak.attacks import SpanAttack

    built, data, update = bert_update(layers, batch, length)
    result = SpanAttack(built.module).reconstruct(update)
    assert result.tokens.shape == (batch, length)
    assert rows_of(result.tokens) == rows_of(data.ids), result.notes
    assert not any("NOT ASSEMBLED" in n or "APPROXIMATE" in n for n in result.notes)
    assert any(f"{batch} with" in n and "within" in n for n in result.notes)


def test_encoder_search_past_its_budget_returns_positions_not_sequences():
    """A budget too small to confirm every sequence: what is returned as a sequence is a true one,
    the rest is marked and holds only tokens its sequences must hold."""
    from gradleak.attacks import SpanAttack

    built, data, update = bert_update(3, 4, 16)
    result = SpanAttack(built.module, search_budget=1000).reconstruct(update)
    assert result.tokens.shape == (4, 16)
    assert any(n.startswith("NOT ASSEMBLED") and "budget was spent" in n for n in result.notes)
    truth = rows_of(data.ids)
    whole = [row for row in result.tokens.tolist() if -1 not in row]
    partial = [row for row in result.tokens.tolist() if -1 in row]
    assert partial and 1 <= len(whole) < 4
    assert all(tuple(row) in truth for row in whole)
    rest = [row for row in data.ids.tolist() if row not in whole]
    for row in partial:
        for i, token in enumerate(row):
            assert token == -1 or all(seq[i] == token for seq in rest)
