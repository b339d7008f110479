"""Decepticons, a causal LM's last tokens, sequence by sequence (:mod:`.decepticons`).

The last token y of a sequence is only the target of position n - 2, whose token s sits in a bin
of some block k. That bin's bias-gradient difference is s's own backward signal:

    db = alpha eps_k dL/dz_s,    dL/dz_s = (1 / N) (p_s - e_y) . D_s,

with N = B (n - 1) targets, p_s the softmax at s, D_s = d logits_s / d z_s the derivative of the
logits at s with respect to the sink coordinate block k writes there (``eps_k`` its weight), and
alpha the update's scale (1 for a FedSGD gradient; clipping rescales it). D_s for every position of
a sequence is one forward-mode derivative of the served model (nothing after block 0's attention
crosses positions). alpha is fitted on the block's other bins, whose targets (the next tokens) are
known; then ``D_s[y] = p_s . D_s - N db / (alpha eps_k)`` names y: the token whose entry of D_s is
nearest, kept when no other token's is within a tenth of that distance's margin. Unlike the final
LayerNorm's sums over the batch, this needs only the sequence's own tokens.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import functional_call, jvp

from ._decepticons_model import block_paths

__all__ = ["sequence_last_tokens"]


def _derivative(view, tensors, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d logits / d z) for ``ids`` (R, m), z added to block ``k``'s sink at every position."""
    module = view.model.get_submodule(block_paths(view, k)["fc_out"])
    sink = torch.zeros(view.width, dtype=torch.float64, device=ids.device)
    sink[-1] = 1.0

    def logits(t):
        handle = module.register_forward_hook(lambda m, inputs, output: output + t * sink.to(output.dtype))
        try:
            return functional_call(view.model, tensors, (ids,), strict=False)
        finally:
            handle.remove()

    zero = torch.zeros((), dtype=torch.float64, device=ids.device)
    with warnings.catch_warnings():     # torch's forward-mode decompositions load with a torch.jit deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return jvp(logits, (zero,), (torch.ones_like(zero),))


def sequence_last_tokens(view, tensors, rows: torch.Tensor, records, roles, batch: int, tolerance: float):
    """``(last tokens (B,) with -1 where not found, notes)`` for the sequences ``rows`` (B, n - 1) of
    token ids (-1: not recovered); ``records``: ``(block, token, position, a, db)`` of the bins
    holding one token."""
    positions = rows.shape[1]
    last = torch.full((rows.shape[0],), -1, dtype=torch.long)
    found_in: dict[int, list[int]] = {}
    mine: dict[int, tuple] = {}
    for b, row in enumerate(rows.tolist()):
        if min(row) < 0:
            continue
        a = roles.feature(torch.tensor(row), torch.arange(positions)).mean(0)
        for record in records:
            k, v, p, ra, db = record
            if p == positions - 1 and v == row[-1] and float((ra - a).norm()) < tolerance * float(a.norm()):
                found_in.setdefault(k, []).append(b)
                mine[b] = record
                break
    n_targets = batch * positions
    fitted, told = [], 0
    for k, members in found_in.items():
        eps = float(tensors[f"{block_paths(view, k)['fc_out']}.weight"].reshape(-1, view.width)[0, -1])
        ids = torch.cat([rows[members], torch.zeros(len(members), 1, dtype=torch.long)], 1)   # the last id unused
        step = max(1, 2**23 // (ids.shape[1] * view.vocab))          # logits and their tangents, ~128 MiB at a time
        parts = [_derivative(view, tensors, ids[j:j + step], k) for j in range(0, ids.shape[0], step)]
        out, derivative = torch.cat([o for o, _ in parts]), torch.cat([d for _, d in parts])
        p = torch.softmax(out.double(), -1)
        pd = (p * derivative).sum(-1)                                             # (R, n)
        alphas = _alphas(members, rows, records, roles, k, pd, derivative, eps, n_targets, tolerance)
        alpha = float(torch.tensor(alphas).median()) if alphas else 1.0
        fitted += alphas
        for i, b in enumerate(members):
            db = mine[b][4]
            target = pd[i, -2] - n_targets * db / (alpha * eps)
            distance = (derivative[i, -2] - target).abs()
            order = torch.argsort(distance)
            best, second = float(distance[order[0]]), float(distance[order[1]])
            if best < 0.1 * (second - best):
                last[b], told = int(order[0]), told + 1
    notes = [f"last tokens of {told} of {rows.shape[0]} sequences from their own bins at position {positions - 1} "
             f"(the update is {(sorted(fitted)[len(fitted) // 2] if fitted else 1.0):.4g} x the gradient of the "
             f"mean loss, fitted on {len(fitted)} bins of known targets)"]
    return last, notes


def _alphas(members, rows, records, roles, k, pd, derivative, eps, n_targets, tolerance) -> list[float]:
    """The update's scale from block ``k``'s bins whose token one sequence alone reaches (its target known)."""
    positions = rows.shape[1]
    out = []
    prefixes = {}
    for b in range(rows.shape[0]):
        row = rows[b].tolist()
        for s in range(positions - 1):
            prefixes.setdefault(tuple(row[: s + 1]), []).append(b)
    for i, b in enumerate(members):
        row = rows[b].tolist()
        a = torch.cumsum(roles.feature(torch.tensor(row), torch.arange(positions)), 0) / \
            torch.arange(1, positions + 1, dtype=torch.float64)[:, None]
        for record in records:
            rk, v, p, ra, db = record
            if rk != k or p >= positions - 1 or v != row[p] or len(prefixes.get(tuple(row[: p + 1]), [])) != 1:
                continue
            if float((ra - a[p]).norm()) < tolerance * float(a[p].norm()):
                predicted = eps * (pd[i, p] - derivative[i, p, row[p + 1]]) / n_targets
                if abs(float(predicted)) > 0:
                    out.append(float(db / predicted))
    return out
