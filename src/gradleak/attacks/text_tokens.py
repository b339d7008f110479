"""Token leakage from the embedding gradient: the bag of words of a text batch, exactly.

An embedding layer looks its input tokens up: its output at each position is row t of the
table, so dL/dE[v] = sum of dL/d(output) over the positions holding token v, and every row of
a token the batch does not contain is exactly zero. The non-zero rows are the batch's set of
tokens, whatever the batch size (Melis et al., "Exploiting Unintended Feature Leakage in
Collaborative Learning", S&P 2019, for word embeddings; used by LAMP and DAGER as a first step).

Conditions: the input embedding is trained (not frozen, not LoRA-only) and is not tied to an
output layer (GPT-2's language-model head reuses the table, and its gradient is dense: every
row is non-zero there). Multiplicities are not recovered, only the set.
"""

from __future__ import annotations

import torch

from ..errors import AttackNotApplicable
from ..limits import check_float
from ..text.arch import TransformerView
from .base import Attack, Reconstruction, register_attack

__all__ = ["BagOfWords", "embedding_rows"]


def embedding_rows(gradient: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Indices of the rows of an embedding gradient (V, d) whose norm exceeds ``threshold`` times
    the largest (0: every non-zero row)."""
    norms = gradient.norm(dim=1)
    return torch.nonzero(norms > threshold * norms.max()).flatten()


@register_attack
class BagOfWords(Attack):
    """The set of tokens of a text batch from the rows of the token-embedding gradient that are
    non-zero (exact, any batch size)."""

    name = "bag-of-words"
    paper = "Melis et al., Exploiting Unintended Feature Leakage in Collaborative Learning, S&P 2019"
    conditions = "the token embedding is trained and not tied to the output layer (a classifier, or tie=False)"

    def __init__(self, model, threat=None, *, threshold: float = 0.0):
        """``threshold``: rows whose norm exceeds this fraction of the largest row's count as used
        (0, the default: every non-zero row; raise it against noise)."""
        super().__init__(model, threat)
        self.threshold = check_float("threshold", threshold, low=0.0)

    def options(self):
        return {**super().options(), "threshold": self.threshold}

    def _reconstruct(self, update):
        view = TransformerView(self.model)
        name = view.embedding_name
        if name not in update.tensors:
            raise AttackNotApplicable(f"the update holds no gradient of the token embedding {name!r} (frozen, or "
                                      "LoRA adapters only)", condition="the token embedding is trained")
        tied = view.decoder and view.task == "causal-lm" and bool(view.hf.config.tie_word_embeddings)
        if tied:
            raise AttackNotApplicable("the token embedding is tied to the language-model head, whose gradient fills "
                                      "every row", condition="the token embedding is not tied to the output layer")
        rows = embedding_rows(update.as_gradient()[name], self.threshold)
        notes = [f"{rows.numel()} of {view.vocab} embedding rows are non-zero: the batch's token set"]
        return Reconstruction(images=None, tokens=rows[None].cpu(), notes=notes,
                              history={"tokens found": [float(rows.numel())]})
