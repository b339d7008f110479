"""Gradient matching on text: the candidate is a batch of continuous token embeddings (B, n, d)
fed to the model in place of its embedding lookup, optimised through the project's one
gradient-matching engine (:class:`~gradleak.attacks.optimization.GradientMatching`), then
projected to the nearest tokens (cosine similarity of the first-layer inputs they make).

- ``tag``: TAG (Deng et al., "TAG: Gradient Attack on Transformer-based Language Models",
  EMNLP Findings 2021): distance ``l2 + 0.01 l1`` over every matched entry, Adam.
- ``lamp``: LAMP (Balunović et al., "LAMP: Extracting Text from Gradients with Language Model
  Priors", NeurIPS 2022). The start is the best by matching loss of ``init_candidates`` random
  embeddings (each vector scaled to the table's mean row norm), then of as many random orders of
  it. The continuous optimisation (Adam, lr 0.01 decayed x0.01 over the run; the engine's loop)
  minimises the per-layer cosine distance (LAMP_COS; ``objective="l2+l1"``: LAMP_L1L2) plus the
  embedding-norm prior ``norm_weight x (mean_i ||x_i|| - mean row norm)^2``. Every
  ``discrete_every`` iterations after the first tenth it alternates with a discrete step
  (:mod:`._lamp_search`): for each sequence, ``proposals`` transformations of the *current
  continuous embeddings* (swap two tokens, move a token, move a span, move a prefix to the end)
  are scored by the matching loss plus ``lm_weight`` x the negative log-likelihood, under a
  language-model prior (:mod:`gradleak.text.prior`, a tiny GPT-2 trained on the corpus's train
  topics), of the tokens they project to; the best (the sequence as it was when none is lower)
  replaces the candidate and the continuous optimisation goes on from it (the optimiser's state
  kept, as in the paper's code). The result is the engine's best iterate, projected.

The token-embedding gradient is not matched (the candidate does not pass through the table);
the bag of words it holds is :mod:`.text_tokens`. Labels are inferred from the classifier head
as for images. Conditions: a classifier (the targets of a causal LM are the text itself).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch

from ..errors import AttackNotApplicable
from ..limits import MAX_ITERATIONS, check_float, check_int
from ..text.arch import TransformerView
from ._evaluators import slot as _slot
from ._lamp_search import choose_start, discrete_step
from .base import Attack, Reconstruction, register_attack
from .optimization import GradientMatching, MatchingConfig

__all__ = ["TAG", "LAMP", "nearest_tokens"]

_TABLES_MAX = 1 << 26   # elements of the per-position token tables kept for a run (256 MiB of float32)


def _position_table(view: TransformerView, tensors, position: int, device) -> torch.Tensor:
    vocab = torch.arange(view.vocab, device=device)
    return torch.nn.functional.normalize(view.token_inputs(tensors, position, vocab), dim=-1)      # (V, d)


def nearest_tokens(view: TransformerView, tensors, x: torch.Tensor, tables: torch.Tensor | None = None) -> torch.Tensor:
    """For each position, the token whose first-layer input (its embedding with the position's,
    through the embedding LayerNorm) is closest in cosine to the candidate's: (B, n). What the
    matching loss constrains is that input, not the raw embedding (the LayerNorm forgets the
    candidate's scale and mean). ``tables``: those inputs normalised, (n, V, d), when kept."""
    with torch.no_grad():
        seen = torch.nn.functional.normalize(view.layer_inputs(tensors, x, 0), dim=-1)      # (B, n, d)
        out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
        for i in range(x.shape[1]):
            table = tables[i] if tables is not None else _position_table(view, tensors, i, x.device)
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
        self._begin(view, tensors, update)
        config = self.config
        self.config = replace(config, layers=names)
        try:
            result = super()._reconstruct(replace(update, input_shape=(update.input_shape[0], view.width),
                                                  data_spec=None))
            notes = self._end()
        finally:
            self.config = config
        tokens = nearest_tokens(view, tensors, result.images.to(tensors[view.embedding_name].dtype))
        projected = f"continuous embeddings projected to the nearest of {view.vocab} tokens (cosine of the first-layer inputs)"
        return Reconstruction(images=None, tokens=tokens.cpu(), labels=result.labels, history=result.history,
                              notes=result.notes + notes + [projected], interrupted=result.interrupted)

    def _begin(self, view, tensors, update) -> None:
        """Before the engine runs on ``update``: what the attack's hooks need for this run."""

    def _end(self) -> list[str]:
        """After the engine ran: notes on what the hooks did."""
        return []


@register_attack
class TAG(_TextMatching):
    """TAG (Deng et al. 2021): token embeddings optimised to match the gradient in ``l2 + 0.01 l1``
    (Adam, lr 0.01, 1,000 iterations), projected to the nearest tokens."""

    name = "tag"
    paper = "Deng et al., TAG: Gradient Attack on Transformer-based Language Models, Findings of EMNLP 2021"
    conditions = "a sequence classifier (gpt2-classifier, bert); labels given or inferable; batch size known"
    preset = MatchingConfig(objective="l2+l1", optimizer="adam", lr=0.01, signed=None, boxed=False, schedule="none",
                            iterations=1000, batched_restarts="loop", batched_targets="loop")


# LAMP's weights (norm prior, language-model prior) per distance, from the paper's runs on BERT
_LAMP_WEIGHTS = {"l2+l1": (25.0, 60.0)}        # LAMP_L1L2; every other distance: LAMP_COS's (1.0, 0.2)
_BURN_IN = 0.1                                  # no discrete step in the first tenth of the iterations


@register_attack
class LAMP(_TextMatching):
    """LAMP (Balunović et al. 2022): a start chosen among random embeddings, then continuous
    matching (per-layer cosine plus the embedding-norm prior) alternating every ``discrete_every``
    iterations with discrete steps that transform the current embeddings (swap, move a token,
    a span, a prefix) scored by the matching loss and a language-model prior."""

    name = "lamp"
    paper = "Balunović et al., LAMP: Extracting Text from Gradients with Language Model Priors, NeurIPS 2022"
    conditions = "a sequence classifier (gpt2-classifier, bert) over the built-in vocabulary (the prior's); labels " \
                 "given or inferable; batch size known"
    preset = MatchingConfig(objective="layer-cosine", optimizer="adam", lr=0.01, signed=None, boxed=False,
                            schedule="exponential", iterations=2000, batched_restarts="loop", batched_targets="loop")

    def __init__(self, model, threat=None, config=None, *, norm_weight: float | None = None,
                 lm_weight: float | None = None, discrete_every: int = 75, proposals: int = 200,
                 init_candidates: int = 500, **overrides):
        """``norm_weight``: the embedding-norm prior's weight; ``lm_weight``: the language-model
        prior's weight in the discrete steps (None: the paper's, 1 and 0.2 for a cosine distance,
        25 and 60 for ``objective="l2+l1"``); ``discrete_every``: iterations between discrete steps
        (0: continuous only); ``proposals``: candidates scored per sequence in a discrete step (the
        sequence as it is among them); ``init_candidates``: random starts (and random orders of
        the best) scored. Other options: the engine's."""
        super().__init__(model, threat, config, **overrides)
        norm, lm = _LAMP_WEIGHTS.get(self.config.objective, (1.0, 0.2))
        self.norm_weight = check_float("norm_weight", norm if norm_weight is None else norm_weight)
        self.lm_weight = check_float("lm_weight", lm if lm_weight is None else lm_weight)
        self.discrete_every = check_int("discrete_every", discrete_every, 0, MAX_ITERATIONS)
        self.proposals = check_int("proposals", proposals, 1, 100_000)
        self.init_candidates = check_int("init_candidates", init_candidates, 1, 100_000)
        self._run = None

    def options(self):
        return {**super().options(), "norm_weight": self.norm_weight, "lm_weight": self.lm_weight,
                "discrete_every": self.discrete_every, "proposals": self.proposals,
                "init_candidates": self.init_candidates}

    def input_prior(self, x):
        if not self.norm_weight or self._run is None:
            return None
        return self.norm_weight * (x.norm(dim=-1).mean() - self._run["norm"]).pow(2)

    # ------------------------------------------------------------ the run's state
    def _begin(self, view, tensors, update) -> None:
        from ..text.prior import prior_vocab

        n = update.input_shape[0]
        if self.lm_weight and (view.vocab != prior_vocab() or n > 256):
            raise AttackNotApplicable(f"lamp's language-model prior reads the built-in {prior_vocab()}-token "
                                      f"vocabulary and at most 256 tokens; this model has {view.vocab} tokens, "
                                      f"sequences of {n} (lm_weight=0 runs without it)",
                                      condition="the built-in tokenizer's vocabulary, sequences <= 256 tokens")
        table = tensors[view.embedding_name]
        kept = None
        if self.lm_weight and self.discrete_every and n * view.vocab * view.width <= _TABLES_MAX:
            kept = torch.stack([_position_table(view, tensors, i, table.device) for i in range(n)])
        self._run = {"view": view, "tensors": tensors, "tables": kept, "norm": table.norm(dim=1).mean(),
                     "generators": {}, "start": [], "steps": []}

    def _end(self) -> list[str]:
        run, self._run = self._run, None
        notes = []
        if run["start"]:
            notes.append(f"start: the lowest matching loss of {self.init_candidates} random embeddings (scaled to the "
                         f"table's mean row norm {float(run['norm']):.3g}) and {self.init_candidates - 1} orders of it: "
                         + ", ".join(f"{v:.4g}" for v in run["start"]))
        steps = run["steps"]
        if steps:
            kinds = Counter(kind for step in steps for kind in step.kept)
            notes.append(f"discrete steps: {len(steps)} (every {self.discrete_every} iterations after the first "
                         f"{_BURN_IN:.0%}), {self.proposals} proposals per sequence, scored by the matching loss + "
                         f"{self.lm_weight:g} x the prior's NLL; kept {sum(kinds.values())} transformations "
                         f"({dict(kinds) or 'none'}); score {steps[0].before:.4g} -> {steps[0].after:.4g} in the "
                         f"first, {steps[-1].before:.4g} -> {steps[-1].after:.4g} in the last")
        elif self.discrete_every:
            notes.append("discrete steps: none ran (fewer iterations than the first one needs)")
        return notes

    def _generator(self, restart: int) -> torch.Generator:
        generators = self._run["generators"]
        if restart not in generators:
            generators[restart] = torch.Generator().manual_seed(self.config.seed * 100_003 + restart + 7_777_777)
        return generators[restart]

    def _score(self, objective, data, y, with_prior: bool):
        """``score(x)``: the matching loss of embeddings ``x`` (B, n, d), plus ``lm_weight`` x the
        prior's mean NLL of the tokens they project to when ``with_prior``."""
        from ..text.prior import sequence_nll

        run = self._run

        def score(x: torch.Tensor) -> float:
            value = float(objective(x, y, data, functional=False).detach())
            if with_prior and self.lm_weight:
                ids = nearest_tokens(run["view"], run["tensors"], x, run["tables"])
                value += self.lm_weight * float(sequence_nll(ids).mean())
            return value

        return score

    # ------------------------------------------------------------- engine hooks
    def initial_candidates(self, group, objective, data, X, Y) -> None:
        """The start of each slot: the best of ``init_candidates`` random embeddings and orders."""
        norm = self._run["norm"].to(X.dtype)

        def scale(x):
            return torch.nn.functional.normalize(x, dim=-1) * norm

        for k, restart in enumerate(group):
            score = self._score(objective, _slot(data, k), None if Y is None else Y[k].detach(), with_prior=False)
            x, value = choose_start(score, X[k], self.init_candidates, self._generator(restart), scale)
            with torch.no_grad():
                X[k].copy_(x)
            self._run["start"].append(value)

    def candidate_step(self, iteration, group, objective, data, X, Y) -> None:
        """Every ``discrete_every`` iterations after the burn-in: LAMP's discrete step on each slot."""
        done, total = iteration + 1, self.config.iterations
        if not self.discrete_every or done % self.discrete_every or done < math.ceil(_BURN_IN * total):
            return
        for k, restart in enumerate(group):
            score = self._score(objective, _slot(data, k), None if Y is None else Y[k].detach(), with_prior=True)
            x, outcome = discrete_step(score, X[k], self.proposals, self._generator(restart))
            with torch.no_grad():
                X[k].copy_(x)
            self._run["steps"].append(outcome)
