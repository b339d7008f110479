"""Encoder (BERT) sequences at batch B > 1 for the span attack (DAGER, Petrov et al., NeurIPS 2024,
arXiv 2405.15586: encoders by a search over whole sequences, decoders greedily by prefixes).

Block 0's span test gives, per position i, the set S_i of the tokens that stood at position i in
some sequence of the batch (|S_i| <= B), but not which sequence held which. Bidirectional attention
makes block 1's input at position i a function of the *whole* sequence, so prefixes cannot be
tested as a decoder's are; a full candidate sequence s (s_i in S_i) can: it is one of the batch's
sequences exactly when its block-1 input at every position lies in block 1's gradient span (a
distance of 0 up to float precision; a sequence mixing tokens of two true ones lands off the span,
at every position its mixing reaches).

The search over the product of the S_i:

- positions with |S_i| = 1 hold that token in every sequence;
- when the product of the other |S_i| is at most the budget, every combination is tested
  (exhaustive, the paper's approach for small batches);
- otherwise coordinate descent on the sum of block-1 span distances over all positions, from
  starts anchored at one token of one position (kept fixed) and initialised, elsewhere, away
  from the sequences already confirmed: each position in turn takes the token of S_i that
  lowers the sum most, until a sweep changes nothing.

A sequence is reported as assembled only when every position's distance is below the limit; the
number of sequences evaluated is bounded (``budget``). What is not confirmed comes back unassembled:
the tokens every remaining sequence must hold (|S_i| = 1, or the one token of S_i no confirmed
sequence holds when one sequence remains), -1 elsewhere, said so in the notes.

Condition: the span tests at blocks 0 and 1 are exact (B x n below the width, no noise) and every
sequence of the batch is distinct (a repeated sequence is confirmed once).
"""

from __future__ import annotations

import math

import torch

from ._span import span_residuals

__all__ = ["DEFAULT_BUDGET", "ENCODER_MARGIN", "assemble_encoder"]

DEFAULT_BUDGET = 2**14     # candidate sequences evaluated at block 1 per update
ENCODER_MARGIN = 0.1       # block-1 limit = this x block 0's tolerance: a sequence whose tokens are all right but
#                            whose context mixes two sequences lands only ~1e-3 off the span (random-init
#                            attention mixes weakly), against float precision for a true one (measured, float64)
CHUNK_TOKENS = 2**16       # tokens per forward pass of block 0 (memory ~ tokens x d x a few)


class _Spent(Exception):
    """The budget of evaluated sequences is spent."""


class _Checker:
    """Block-1 span distances of whole candidate sequences, counted against the budget."""

    def __init__(self, view, tensors, basis, lora_a, budget: int, positions: slice):
        self.view, self.tensors, self.basis, self.lora_a = view, tensors, basis, lora_a
        self.budget, self.used, self.positions = budget, 0, positions

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """(N, n') distances of each tested position's block-1 input to the span, for sequences (N, n)."""
        if self.used + sequences.shape[0] > self.budget:
            raise _Spent
        self.used += sequences.shape[0]
        rows = max(1, CHUNK_TOKENS // sequences.shape[1])
        parts = []
        for start in range(0, sequences.shape[0], rows):
            x1 = self.view.layer_inputs(self.tensors, sequences[start:start + rows], 1)[:, self.positions]
            if self.lora_a is not None:
                x1 = x1 @ self.lora_a.T.to(x1.dtype)
            parts.append(span_residuals(self.basis, x1))
        return torch.cat(parts)


def _exhaustive(check: _Checker, candidates: list[torch.Tensor], limit: float, found: list, worst: list):
    """Every combination of the per-position candidates: those whose every distance is below
    ``limit`` appended to ``found``, their largest distances to ``worst``."""
    sizes = [c.numel() for c in candidates]
    total = math.prod(sizes)
    rows = max(1, CHUNK_TOKENS // len(candidates))
    for start in range(0, total, rows):
        index = torch.arange(start, min(total, start + rows), device=candidates[0].device)
        columns = []
        for c, size in zip(reversed(candidates), reversed(sizes)):   # mixed-radix digits, last position fastest
            columns.append(c[index % size])
            index = index // size
        sequences = torch.stack(columns[::-1], dim=1)
        largest = check(sequences).max(dim=1).values
        passed = largest < limit
        found += list(sequences[passed])
        worst += largest[passed].tolist()


def _sweeps(check: _Checker, sequence, distance, movable, candidates, weight, stop: float):
    """Coordinate descent on ``weight`` . distances: each movable position in turn takes the token of
    its candidates that lowers it most, until a sweep changes nothing or every distance is below ``stop``."""
    changed = True
    while changed and not bool((distance < stop).all()):
        changed = False
        for i in movable:
            trial = sequence[None].repeat(candidates[i].numel(), 1)
            trial[:, i] = candidates[i]
            trial = trial[trial[:, i] != sequence[i]]
            if trial.shape[0] == 0:
                continue
            scores = check(trial)
            best = int((scores @ weight).argmin())
            if float(scores[best] @ weight) < float(distance @ weight):
                sequence, distance, changed = trial[best], scores[best], True
                if bool((distance < stop).all()):
                    break
    return sequence, distance


def _descend(check: _Checker, start: torch.Tensor, anchor: int, candidates, stop: float):
    """Coordinate descent from ``start`` on the sum of the block-1 distances over the tested
    positions, position ``anchor`` fixed. Returns (sequence, distances)."""
    distance = check(start[None])[0]
    movable = [i for i, c in enumerate(candidates) if c.numel() > 1 and i != anchor]
    return _sweeps(check, start, distance, movable, candidates, torch.ones_like(distance), stop)


def _starts(candidates: list[torch.Tensor], confirmed: list[torch.Tensor], rounds: int = 64):
    """(anchor position, start sequence) pairs: each token of each ambiguous position (largest sets
    first) as the anchor; elsewhere a token no confirmed sequence holds there (where there is one):
    the first in the first round, then drawn at random (a fixed seed: the attack is deterministic)."""
    order = sorted((i for i, c in enumerate(candidates) if c.numel() > 1), key=lambda i: -candidates[i].numel())
    generator = torch.Generator().manual_seed(0)
    for round_ in range(rounds):
        for anchor in order:
            for token in candidates[anchor]:
                start = []
                for i, c in enumerate(candidates):
                    held = {int(s[i]) for s in confirmed}
                    free = [int(t) for t in c if int(t) not in held] or [int(t) for t in c]
                    pick = 0 if round_ == 0 else int(torch.randint(len(free), (1,), generator=generator))
                    start.append(free[pick])
                start[anchor] = int(token)
                yield anchor, torch.tensor(start, dtype=candidates[0].dtype, device=candidates[0].device)


def _rest(candidates: list[torch.Tensor], confirmed: list[torch.Tensor], count: int) -> torch.Tensor:
    """``count`` unassembled rows: the tokens the remaining sequences must hold, -1 elsewhere."""
    row = []
    for i, c in enumerate(candidates):
        free = set(c.tolist()) - {int(s[i]) for s in confirmed}
        if c.numel() == 1:
            row.append(int(c[0]))
        elif count == 1 and len(free) == 1:        # the one remaining sequence holds the one token left
            row.append(free.pop())
        else:
            row.append(-1)
    return torch.tensor(row, dtype=candidates[0].dtype, device=candidates[0].device)[None].repeat(count, 1)


def _search(check: _Checker, candidates, limit: float, stop: float, wanted: int | None, found: list, worst: list):
    """Coordinate descent from every start until ``wanted`` distinct sequences pass ``limit``; each
    appended to ``found`` with its largest distance to ``worst`` as it comes (the budget may end it)."""
    seen: set[tuple[int, ...]] = set()
    for anchor, start in _starts(candidates, found):
        if wanted is not None and len(found) >= wanted:
            break
        key = (anchor, *start.tolist())
        if key in seen:
            continue
        seen.add(key)
        sequence, distance = _descend(check, start, anchor, candidates, stop)
        if bool((distance < limit).all()) and not any(bool((sequence == s).all()) for s in found):
            found.append(sequence)
            worst.append(float(distance.max()))


def assemble_encoder(view, tensors, candidates: list[torch.Tensor], basis, lora_a, limit: float, exact: bool,
                     batch: int | None, budget: int = DEFAULT_BUDGET) -> tuple[torch.Tensor, list[str]]:
    """``(sequences (B, n), notes)`` from the per-position candidates of block 0 and block 1's span
    (``basis``, ``lora_a``): the sequences found first, then unassembled rows (-1 where the
    position's token is not known). ``exact``: the update is exact and ``limit`` a float-precision
    tolerance (else a noisy update's limit: the closest local minima are kept, said APPROXIMATE).
    ``batch`` None: every sequence found within the budget.

    When block 1 is a two-block classifier's last block, its projections' gradients hold the
    other positions' keys and values only as attention-weighted sums: only position 0 (pooled) is
    tested there, its input being a function of the whole sequence all the same."""
    last = view.layers == 2 and view.task == "classification"
    check = _Checker(view, tensors, basis, lora_a, budget, slice(0, 1) if last else slice(None))
    combinations = math.prod(c.numel() for c in candidates)
    found: list[torch.Tensor] = []
    worst: list[float] = []
    spent = False
    try:
        if combinations <= budget:
            how = f"all {combinations} combinations of the positions' tokens tested"
            _exhaustive(check, candidates, limit, found, worst)
        else:
            how = f"{combinations:.3g} combinations: coordinate descent from anchored starts"
            _search(check, candidates, limit, limit if exact else 0.0, batch, found, worst)
    except _Spent:
        spent = True
    tested = "position 0's" if last else "every position's"
    notes = [("" if exact else "APPROXIMATE: ") + f"encoder at batch {batch if batch is not None else '?'}: {how}; "
             f"{check.used} sequences evaluated at block 1 (budget {check.budget}); {len(found)} with {tested} "
             f"block-1 input within {limit:.2g} of the span"]
    if batch is not None and len(found) > batch:
        notes.append(f"{len(found)} sequences pass for a batch of {batch}: the {batch} closest kept")
        keep = sorted(range(len(found)), key=worst.__getitem__)[:batch]
        found = [found[k] for k in keep]
    missing = max(1 if not found else 0, (batch or 0) - len(found))
    if missing:
        why = "the budget was spent" if spent else "the search found no more"
        notes.append(f"NOT ASSEMBLED: {missing} of {batch if batch is not None else '?'} sequences ({why}; a "
                     "repeated sequence is found once): their rows hold the tokens every remaining sequence "
                     "must hold and -1 elsewhere, not sequences")
    rows = ([torch.stack(found)] if found else []) + ([_rest(candidates, found, missing)] if missing else [])
    return torch.cat(rows), notes
