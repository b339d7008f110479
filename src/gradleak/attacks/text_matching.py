"""Gradient matching on text: the candidate is a batch of continuous token embeddings (B, n, d)
fed to the model in place of its embedding lookup, optimised through the project's one
gradient-matching engine (:class:`~gradleak.attacks.optimization.GradientMatching`), then
projected to the nearest tokens (cosine similarity of the first-layer inputs they make).

- ``tag``: TAG (Deng et al., "TAG: Gradient Attack on Transformer-based Language Models",
  EMNLP Findings 2021): distance ``l2 + 0.01 l1`` over every matched entry, Adam.
- ``lamp``: LAMP (Balunović et al., "LAMP: Extracting Text from Gradients with Language Model
  Priors", NeurIPS 2022): cosine distance plus the embedding-norm prior (each candidate
  embedding's norm pulled to the table's mean row norm), then discrete token transformations
  (swap two tokens, move a token, move a span) kept when they lower the gradient distance of
  the discrete sequence plus ``lm_weight`` x the negative log-likelihood under a language-model
  prior (:mod:`gradleak.text.prior`, a tiny GPT-2 trained on the corpus's train topics).
  LAMP alternates the continuous and discrete phases; here one continuous phase is followed by
  one discrete phase.

The token-embedding gradient is not matched (the candidate does not pass through the table);
the bag of words it holds is :mod:`.text_tokens`. Labels are inferred from the classifier head
as for images. Conditions: a classifier (the targets of a causal LM are the text itself).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.func import functional_call, grad

from ..errors import AttackNotApplicable
from ..limits import check_float, check_int
from ..losses import get_loss
from ..text.arch import TransformerView
from .base import Attack, Reconstruction, register_attack
from .matching import gradient_distance
from .optimization import GradientMatching, MatchingConfig

__all__ = ["TAG", "LAMP", "nearest_tokens"]


def nearest_tokens(view: TransformerView, tensors, x: torch.Tensor) -> torch.Tensor:
    """For each position, the token whose first-layer input (its embedding with the position's,
    through the embedding LayerNorm) is closest in cosine to the candidate's: (B, n). What the
    matching loss constrains is that input, not the raw embedding (the LayerNorm forgets the
    candidate's scale and mean)."""
    with torch.no_grad():
        seen = torch.nn.functional.normalize(view.layer_inputs(tensors, x, 0), dim=-1)      # (B, n, d)
        vocab = torch.arange(view.vocab, device=x.device)
        out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
        for i in range(x.shape[1]):
            table = torch.nn.functional.normalize(view.token_inputs(tensors, i, vocab), dim=-1)   # (V, d)
            out[:, i] = (seen[:, i] @ table.T).argmax(-1)
    return out


class _TextMatching(GradientMatching):
    """The engine on token embeddings (not registered; TAG and LAMP are its presets)."""

    def reconstruct_many(self, updates, *, monitors=None, progress=None):
        # the embedding problem is prepared per update in _reconstruct: one update after the other
        return Attack.reconstruct_many(self, updates, monitors=monitors, progress=progress)

    def _prepare(self, update):
        view = TransformerView(self.model)
        if update.loss == "causal_lm":
            raise AttackNotApplicable(f"{self.name} matches a classifier's gradient; a causal LM's targets are the text "
                                      "itself (use dager)", condition="a sequence classifier (gpt2-classifier, bert)")
        params, buffers = self.parameters_at_round(update)
        tensors = {**buffers, **params}
        names = tuple(n for n in update.tensors if n != view.embedding_name)
        return view, tensors, names

    def _reconstruct(self, update):
        view, tensors, names = self._prepare(update)
        self._table_norm = tensors[view.embedding_name].norm(dim=1).mean()
        config = self.config
        self.config = replace(config, layers=names)
        try:
            result = super()._reconstruct(replace(update, input_shape=(update.input_shape[0], view.width),
                                                  data_spec=None))
        finally:
            self.config = config
        tokens = nearest_tokens(view, tensors, result.images.to(tensors[view.embedding_name].dtype))
        tokens, notes = self._discrete(tokens, update, view, names, result.labels)
        result.notes += notes
        return Reconstruction(images=None, tokens=tokens.cpu(), labels=result.labels, history=result.history,
                              notes=result.notes + [f"continuous embeddings projected to the nearest of {view.vocab} "
                                                    "tokens (cosine of the first-layer inputs)"],
                              interrupted=result.interrupted)

    def _discrete(self, tokens, update, view, names, labels):
        return tokens, []


@register_attack
class TAG(_TextMatching):
    """TAG (Deng et al. 2021): token embeddings optimised to match the gradient in ``l2 + 0.01 l1``
    (Adam, lr 0.01, 1,000 iterations), projected to the nearest tokens."""

    name = "tag"
    paper = "Deng et al., TAG: Gradient Attack on Transformer-based Language Models, Findings of EMNLP 2021"
    conditions = "a sequence classifier (gpt2-classifier, bert); labels given or inferable; batch size known"
    preset = MatchingConfig(objective="l2+l1", optimizer="adam", lr=0.01, signed=None, boxed=False, schedule="none",
                            iterations=1000, batched_restarts="loop", batched_targets="loop")


@register_attack
class LAMP(_TextMatching):
    """LAMP (Balunović et al. 2022): cosine matching plus the embedding-norm prior on token
    embeddings, then discrete token transformations scored by the gradient distance and a
    language-model prior."""

    name = "lamp"
    paper = "Balunović et al., LAMP: Extracting Text from Gradients with Language Model Priors, NeurIPS 2022"
    conditions = "a sequence classifier (gpt2-classifier, bert) over the built-in vocabulary (the prior's); labels " \
                 "given or inferable; batch size known"
    preset = MatchingConfig(objective="cosine", optimizer="adam", lr=0.01, signed=None, boxed=False, schedule="none",
                            iterations=1000, batched_restarts="loop", batched_targets="loop")

    def __init__(self, model, threat=None, config=None, *, norm_weight: float = 0.1, lm_weight: float = 0.2,
                 swaps: int = 200, proposals: int = 16, **overrides):
        """``norm_weight``: the embedding-norm prior's weight; ``lm_weight``: the language-model
        prior's weight in the discrete phase; ``swaps``: rounds of the discrete phase;
        ``proposals``: transformations tried per round. Other options: the engine's."""
        super().__init__(model, threat, config, **overrides)
        self.norm_weight = check_float("norm_weight", norm_weight, low=0.0)
        self.lm_weight = check_float("lm_weight", lm_weight, low=0.0)
        self.swaps = check_int("swaps", swaps, 0, 1_000_000)
        self.proposals = check_int("proposals", proposals, 1, 10_000)
        self._table_norm = None

    def options(self):
        return {**super().options(), "norm_weight": self.norm_weight, "lm_weight": self.lm_weight,
                "swaps": self.swaps, "proposals": self.proposals}

    def input_prior(self, x):
        if not self.norm_weight or self._table_norm is None:
            return None
        return self.norm_weight * (x.norm(dim=-1) - self._table_norm).pow(2).mean()

    def _discrete(self, tokens, update, view, names, labels):
        """Random transformations of the discrete sequences, kept when they lower the score."""
        if not self.swaps:
            return tokens, []
        from ..text.prior import sequence_nll

        params, buffers = self.parameters_at_round(update)
        loss_fn = get_loss(update.loss)
        target = {n: update.tensors[n] for n in names}
        weights = torch.ones(len(names), dtype=next(iter(target.values())).dtype)
        y = labels if labels is not None else update.labels

        def score(ids: torch.Tensor) -> float:
            g = grad(lambda p: loss_fn(functional_call(self.model, ({**p}, buffers), (ids,)), y))(params)
            distance = gradient_distance(g, target, list(names), weights, "cosine", uniform=True)
            prior = sequence_nll(ids).mean() if self.lm_weight else 0.0
            return float(distance + self.lm_weight * prior)

        generator = torch.Generator().manual_seed(self.config.seed)
        best, best_score = tokens.clone(), score(tokens)
        start = best_score
        n = tokens.shape[1]
        for _ in range(self.swaps):
            for _ in range(self.proposals):
                cand = best.clone()
                b = int(torch.randint(0, cand.shape[0], (1,), generator=generator))
                i, j = sorted(torch.randint(0, n, (2,), generator=generator).tolist())
                kind = int(torch.randint(0, 3, (1,), generator=generator))
                row = cand[b].tolist()
                if kind == 0:
                    row[i], row[j] = row[j], row[i]                          # swap two tokens
                elif kind == 1:
                    row.insert(j, row.pop(i))                                # move one token
                else:
                    k = int(torch.randint(i, j + 1, (1,), generator=generator))
                    row = row[:i] + row[k:j + 1] + row[i:k] + row[j + 1:]    # move a span
                cand[b] = torch.tensor(row, dtype=cand.dtype)
                value = score(cand)
                if value < best_score:
                    best, best_score = cand, value
        return best, [f"discrete phase: {self.swaps} rounds of {self.proposals} transformations; score "
                      f"{start:.4g} -> {best_score:.4g} (cosine distance + {self.lm_weight:g} x prior NLL)"]
