"""The exact span attack on transformers in the manner of DAGER (Petrov et al., "DAGER: Exact
Gradient Inversion for Large Language Models", NeurIPS 2024, arXiv 2405.15586).

1. **Tokens.** The weight gradient of block 0's attention projection spans the inputs it saw,
   one per token position (:mod:`._span`). Each candidate token v at position i has a known
   first-layer input (embedding of v plus position i, through the LayerNorm), so v stood at
   position i in some sequence exactly when that input lies in the span: a distance of 0 up
   to float precision, against ~sqrt(1 - rank/d) for any other token.
2. **Sequences** (decoders). Block 1's projection gradient spans block 0's outputs. Causal
   attention makes block 0's output at position i a function of tokens 0..i only, so prefixes
   grow one position at a time: each prefix is extended by each candidate of the next
   position, and only the extensions whose block-1 input lies in block 1's span survive.
3. **The last token** of a causal-LM update never reaches a layer's input gradient (no loss is
   computed at the last position): it is a target only. With every other token known, the
   gradient of the final LayerNorm gives it (:mod:`._dager_last`).

Condition: the number of input positions (B x n, or B x (n - 1) for a causal LM) is below the
width of the space the gradient lives in (d for full weights; for LoRA adapters of rank r the
span has rank <= r, so B x n <= r). Past it the span is the whole space: the attack refuses.

**Encoders** (BERT): block 1's input at a position depends on the whole sequence (bidirectional
attention), so sequences are not grown by prefixes: at B > 1 whole candidate sequences over the
tokens each position admits are tested at block 1 (:mod:`._dager_encoder`: every combination
when there are few, else a bounded coordinate descent). A sequence is returned as one only when
block 1 confirms it at float precision; the rest come back unassembled (-1 where the position's
token is not known), said so in the notes. Float64 updates; in float32 a random-init classifier's
gradient reaches the positions other than the pooled one too weakly for the tests to stay exact.
"""

from __future__ import annotations

import time

import torch

from ..errors import AttackNotApplicable
from ..limits import check_bool, check_float, check_int
from ..text.arch import TransformerView, decoder_extend, decoder_prefix_cache
from ._dager_encoder import DEFAULT_BUDGET, ENCODER_MARGIN, assemble_encoder
from ._span import default_tolerance, span_basis, span_residuals
from .base import Attack, Reconstruction, register_attack

__all__ = ["SpanAttack", "position_candidates"]

MAX_EXTENSIONS = 2**18   # candidate prefixes tested at one position (memory: each is a d-vector per block)


def _test_space(matrix: torch.Tensor, lora_a: torch.Tensor | None, vectors: torch.Tensor) -> torch.Tensor:
    return vectors if lora_a is None else vectors @ lora_a.T.to(vectors.dtype)


def position_candidates(view: TransformerView, tensors, basis: torch.Tensor, lora_a, positions: int,
                        tolerance: float, ratio: float, max_candidates: int | None
                        ) -> tuple[list[torch.Tensor], list[float], bool]:
    """Per position, the tokens whose first-layer input lies in the span: within ``tolerance``
    when every position has such a token (an exact update), else (a noisy update) closer than
    ``ratio`` x the position's median distance (far below chance); the closest ``max_candidates``;
    where none passes, the closest token alone. Also the largest distance kept per position, and
    whether the update was exact."""
    vocab = torch.arange(view.vocab, device=basis.device)
    distances = [span_residuals(basis, _test_space(basis, lora_a, view.token_inputs(tensors, i, vocab)))
                 for i in range(positions)]
    exact = all(bool((d < tolerance).any()) for d in distances)
    crowded = max(int((d < tolerance).sum()) for d in distances)
    if exact and crowded > view.vocab // 2:
        raise AttackNotApplicable(
            f"{crowded} of {view.vocab} tokens lie in the span at one position (rank {basis.shape[1]} of "
            f"{basis.shape[0]}): the test does not tell tokens apart", condition="the gradient's span far from full")
    candidates, worst = [], []
    for distance in distances:
        limit = tolerance if exact else ratio * float(distance.median())
        keep = torch.nonzero(distance < limit).flatten()
        keep = keep[torch.argsort(distance[keep])][:max_candidates]
        if keep.numel() == 0:
            keep = torch.argmin(distance)[None]
        candidates.append(keep)
        worst.append(float(distance[keep].max()))
    return candidates, worst, exact


@register_attack
class SpanAttack(Attack):
    """DAGER-style exact recovery of token sequences from a transformer's gradient (GPT-2, BERT;
    full fine-tuning or LoRA): token candidates by the span of block 0's attention-projection
    gradient, sequences assembled with block 1's span (decoders position by position; encoders by a
    bounded search over whole sequences)."""

    name = "dager"
    paper = "Petrov et al., DAGER: Exact Gradient Inversion for Large Language Models, NeurIPS 2024 (arXiv 2405.15586)"
    conditions = ("a gradient (or one-step delta) of a GPT-2/BERT text model; B x n input positions below the "
                  "width the gradient spans (d, or the LoRA rank r); no dropout; encoders at B > 1: the sequences a bounded "
                  "search confirms (search_budget), the rest unassembled")

    def __init__(self, model, threat=None, *, tolerance: float | None = None, ratio: float = 0.5,
                 rank_tol: float | None = None, max_candidates: int | None = None, last_token: bool = True,
                 search_budget: int = DEFAULT_BUDGET):
        """``tolerance``: relative distance to the span below which a candidate is in it (default
        1e-3 in float32, 1e-7 in float64); ``ratio``: where no candidate is within tolerance (noise),
        those closer than ``ratio`` x the median distance are kept; ``rank_tol``: singular values
        below this fraction of the largest are not part of the span; ``max_candidates``: tokens
        kept per position (default: all that pass); ``last_token``: recover a causal LM's last
        tokens from the final LayerNorm's gradient; ``search_budget``: whole sequences an encoder's
        search may test at block 1 (B > 1), past which the rest is returned unassembled."""
        super().__init__(model, threat)
        self.tolerance = None if tolerance is None else check_float("tolerance", tolerance, low_open=True)
        self.ratio = check_float("ratio", ratio, low_open=True)
        self.rank_tol = None if rank_tol is None else check_float("rank_tol", rank_tol, low_open=True)
        self.max_candidates = None if max_candidates is None else check_int("max_candidates", max_candidates, 1,
                                                                            1_000_000)
        self.last_token = check_bool("last_token", last_token)
        self.search_budget = check_int("search_budget", search_budget, 1, 2**24)

    def options(self):
        return {**super().options(), "tolerance": self.tolerance, "ratio": self.ratio, "rank_tol": self.rank_tol,
                "max_candidates": self.max_candidates, "last_token": self.last_token,
                "search_budget": self.search_budget}

    # ------------------------------------------------------------------ the attack
    def _basis(self, view, gradient, tensors, k, inputs):
        """The span of block ``k``'s inputs and the LoRA map (None: full weights), or a refusal.

        ``inputs`` (B x n', when the batch size is known) caps the rank. What decides is the
        gradient's measured rank: it counts the *distinct* inputs (block 0: (token, position)
        pairs; block 1 of a decoder: distinct prefixes), so a batch whose sequences repeat them
        stays attackable past B x n' >= d as long as the span does not fill the space. LoRA: the gradient of A has rank <= r, so with more inputs than
        r a rank of r says nothing about which inputs it misses."""
        matrix, lora_a = view.projection_gradient(gradient, tensors, k)
        space, columns = matrix.shape
        cap = inputs if inputs is not None and inputs < space else None
        basis = span_basis(matrix, rank_cap=cap, rtol=self.rank_tol)
        rank = basis.shape[1]
        if view.lora and lora_a is None and rank >= columns and (inputs is None or inputs > columns):
            raise AttackNotApplicable(
                f"{'?' if inputs is None else inputs} input positions (batch x tokens) > {columns}, the rank the LoRA "
                f"adapters' gradient can have at block {k}, and it has that rank: it spans only part of the inputs",
                condition=f"B x n <= {columns} (LoRA rank r per adapted projection)")
        if rank >= space - max(2, space // 100):   # full, up to the few smallest singular values float32 loses
            what = "input positions (batch x tokens)" if inputs is not None else "inputs"
            raise AttackNotApplicable(
                f"{'?' if inputs is None else inputs} {what} >= {space}, the width of the space block {k}'s gradient "
                f"spans, and the gradient has (numerically) full rank {rank}: every candidate lies in the span, "
                "nothing can be told apart", condition=f"B x n < {space} ({'LoRA rank' if view.lora else 'model width d'}), "
                "or fewer distinct inputs than that (block 0: (token, position) pairs; block 1: prefixes)")
        return basis, lora_a

    def _reconstruct(self, update):
        started = time.perf_counter()
        view = TransformerView(self.model)
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        tensors = {**buffers, **params}
        length = int(update.input_shape[0])
        causal = update.loss == "causal_lm"
        reached = length - 1 if causal else length          # positions whose input reaches the gradient
        batch = update.batch_size
        inputs = None if batch is None else batch * reached
        dtype = gradient[next(iter(gradient))].dtype
        tolerance = self.tolerance or default_tolerance(dtype)
        basis, lora_a = self._basis(view, gradient, tensors, 0, inputs)
        notes = [f"span of block 0: rank {basis.shape[1]} of {basis.shape[0]}; {reached} positions tested "
                 f"against {view.vocab} tokens each"]
        if inputs is not None and inputs >= basis.shape[0]:
            notes.append(f"{batch} x {reached} = {inputs} input positions >= {basis.shape[0]}, but the gradient's rank "
                         f"is {basis.shape[1]}: repeated (token, position) pairs; the span test still holds")
        with torch.no_grad():
            candidates, worst, exact = position_candidates(view, tensors, basis, lora_a, reached, tolerance,
                                                           self.ratio, self.max_candidates)
            if not exact:
                notes.append(f"APPROXIMATE: some positions have no token within tolerance {tolerance:g} (a noisy "
                             f"update): tokens closer than {self.ratio:g} x the median distance kept")
            several = any(c.numel() > 1 for c in candidates)
            if view.layers > 1 and (view.decoder or (several and batch != 1)):
                basis2, lora_a2 = self._basis(view, gradient, tensors, 1, inputs)
                limit = tolerance if exact else self._chance_limit(view, tensors, basis2, lora_a2)
                if view.decoder:
                    tokens, more = self._assemble(view, tensors, candidates, basis2, lora_a2, limit, batch)
                else:
                    limit = limit * ENCODER_MARGIN if exact else limit
                    tokens, more = assemble_encoder(view, tensors, candidates, basis2, lora_a2, limit, exact, batch,
                                                    self.search_budget)
                notes += more
            elif batch == 1 or not several:
                tokens = torch.stack([c[:1] for c in candidates], dim=1).expand(batch or 1, -1).clone()
            else:
                tokens = torch.stack([c[0] if c.numel() == 1 else torch.tensor(-1) for c in candidates])[None]
                tokens = tokens.expand(batch or 1, -1).clone()
                notes.append("NOT ASSEMBLED: a one-block encoder has no block 1 to test whole sequences: tokens of "
                             "each position recovered as a set; positions with several tokens are -1")
            if causal:
                last = torch.full((tokens.shape[0], 1), -1, dtype=tokens.dtype, device=tokens.device)
                if self.last_token and bool((tokens >= 0).all()):
                    from ._dager_last import last_tokens

                    found, more = last_tokens(view, tensors, gradient, tokens, batch, tolerance)
                    notes += more
                    last = found[:, None] if found is not None else last
                tokens = torch.cat([tokens, last], dim=1)
        history = {"candidates per position": [float(c.numel()) for c in candidates],
                   "largest kept distance per position": worst}
        notes.append(f"{tokens.shape[0]} sequence(s) of {length} tokens in {time.perf_counter() - started:.2f} s")
        return Reconstruction(images=None, tokens=tokens.cpu(), history=history, notes=notes)

    def _chance_limit(self, view, tensors, basis, lora_a) -> float:
        """A noisy update's limit at block 1: ``ratio`` x the median distance of every token's
        block-1 input at position 0 (chance level)."""
        every = torch.arange(view.vocab, device=basis.device)[:, None]
        chance = span_residuals(basis, _test_space(basis, lora_a, view.layer_inputs(tensors, every, 1)))
        return self.ratio * float(chance.median())

    def _assemble(self, view, tensors, candidates, basis, lora_a, limit, batch):
        """Grow prefixes position by position; keep an extension when block 1's input at the new
        position lies in block 1's span (distance below ``limit``; a prefix none of whose
        extensions passes keeps its closest). Returns (sequences, notes)."""
        stuck_at: list[int] = []
        device = basis.device
        first = candidates[0]
        x1 = view.layer_inputs(tensors, first[:, None], 1)[:, 0]
        distance = span_residuals(basis, _test_space(basis, lora_a, x1))
        passed = distance < limit
        if not passed.any():
            passed = distance == distance.min()
            stuck_at.append(0)
        prefixes, score = first[passed][:, None], distance[passed]
        cap = None if batch is None else 4 * batch
        for i in range(1, len(candidates)):
            cand = candidates[i]
            keys, values = decoder_prefix_cache(view, tensors, prefixes)
            p, c = prefixes.shape[0], cand.shape[0]
            if p * c > MAX_EXTENSIONS:
                raise AttackNotApplicable(f"position {i}: {p} prefixes x {c} candidate tokens = {p * c} extensions to "
                                          f"test, over {MAX_EXTENSIONS}: the spans do not narrow the search enough",
                                          condition="a discriminative span at blocks 0 and 1")
            grown = torch.cat([prefixes.repeat_interleave(c, 0), cand.repeat(p)[:, None]], dim=1)
            owner = torch.arange(p, device=device).repeat_interleave(c)
            chunk = max(1, 2**25 // (keys[0].numel() + 1))           # ~128 MiB of keys and values per chunk
            parts = []
            for start in range(0, grown.shape[0], chunk):
                rows = slice(start, start + chunk)
                h0 = self._embed_at(view, tensors, grown[rows, -1], i)
                x0 = view._call(f"{view.block(0)}.ln_1", tensors, h0)
                x1, _, _ = decoder_extend(view, tensors, h0, x0, keys[owner[rows]], values[owner[rows]])
                parts.append(span_residuals(basis, _test_space(basis, lora_a, x1)))
            distance = torch.cat(parts)
            passed = distance < limit
            best = distance.reshape(p, c).argmin(1) + torch.arange(p, device=device) * c
            stuck = ~passed.reshape(p, c).any(1)                 # prefixes with no extension passing
            passed[best[stuck]] = True
            if bool(stuck.any()):
                stuck_at.append(i)
            score = score.repeat_interleave(c) + distance
            prefixes, score = grown[passed], score[passed]
            if cap is not None and prefixes.shape[0] > cap:      # a noisy update: the closest 4 B go on
                order = torch.argsort(score)[:cap]
                prefixes, score = prefixes[order], score[order]
        notes = [] if not stuck_at else [f"APPROXIMATE: at {len(stuck_at)} of {len(candidates)} positions a prefix "
                                         "had no extension within the limit; its closest kept"]
        if batch is not None and prefixes.shape[0] > batch:
            notes.append(f"{prefixes.shape[0]} sequences pass for a batch of {batch}: the {batch} closest kept")
            prefixes = prefixes[torch.argsort(score)[:batch]]
        return prefixes, notes

    @staticmethod
    def _embed_at(view, tensors, tokens, position):
        base = view.prefix + "transformer"
        return view._call(f"{base}.wte", tensors, tokens) + view._call(
            f"{base}.wpe", tensors, torch.tensor([position], device=tokens.device))
