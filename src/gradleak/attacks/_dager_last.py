"""The last token of each sequence of a causal-LM update, from the final LayerNorm's gradient.

Under the next-token loss the last token t_n of a sequence is only a target: no loss is
computed at its position, so its input reaches no gradient. It shows in the output layer. With
o = gamma * xhat + beta (GPT-2's ``ln_f``), logits = o W^T and the mean cross-entropy over the
N = B (n - 1) targets:

    dL/dbeta  = (1/N) sum_{b,i} W^T (p_{b,i} - e_{y_{b,i}})
    dL/dgamma = (1/N) sum_{b,i} (W^T (p_{b,i} - e_{y_{b,i}})) * xhat_{b,i}

Once tokens 1..n-1 are known (the span attack), every p and xhat and every target but the last
ones are known, so ``sum_b W[t_b] = t`` and ``sum_b W[t_b] * xhat_{b,n-1} = t'`` with known
t, t' (up to the update's scale, fitted with the multiset: clipping scales an update). The first gives the multiset of last tokens (orthogonal matching pursuit over the rows
of W, counts by least squares, exact when the residual vanishes); the second assigns them to
the sequences (least squares over B x |multiset| unknowns, exact when that is at most d). On a
noisy update both are best estimates, said so in the notes.
"""

from __future__ import annotations

import torch

__all__ = ["last_tokens"]


def _pursuit(rows: torch.Tensor, target: torch.Tensor, free: torch.Tensor, atoms: int, tolerance: float):
    """``target = alpha * free + sum of rows with positive integer counts``: the rows, ``alpha``
    (free, not rounded: the update's unknown scale, e.g. after clipping) and whether the fit is
    exact (orthogonal matching pursuit, least-squares counts rounded)."""
    support: list[int] = []
    residual = target - free * (free @ target) / (free @ free).clamp_min(1e-30)
    norms = rows.norm(dim=1).clamp_min(1e-30)
    coef = torch.zeros(1, dtype=rows.dtype)
    for _ in range(atoms):
        score = (rows @ residual).abs() / norms
        if support:
            score[torch.tensor(support)] = -1
        support.append(int(score.argmax()))
        basis = torch.cat([free[:, None], rows[support].T], dim=1)
        coef = torch.linalg.lstsq(basis, target[:, None]).solution[:, 0]
        residual = target - basis @ coef
        if residual.norm() <= tolerance * target.norm():
            break
    alpha, counts = coef[0], coef[1:].round().clamp_min(0)
    exact = bool((counts >= 1).all()) and \
        bool((target - alpha * free - rows[support].T @ counts).norm() <= 10 * tolerance * target.norm())
    keep = [k for k, c in enumerate(counts.tolist()) if c >= 1] or [int(coef[1:].argmax())]
    return [support[k] for k in keep], float(alpha), exact


def _assign(atoms: torch.Tensor, target: torch.Tensor, count: int) -> torch.Tensor:
    """One token per sequence: ``sum_b atoms[b, choice_b] = target``. Least squares over all
    B x |S| weights when that is at most d (exact); otherwise orthogonal matching pursuit, one
    atom per sequence (B atoms among B |S|, incoherent in d dimensions)."""
    b, s, d = atoms.shape
    flat = atoms.reshape(b * s, d).T                                       # (d, B |S|)
    if b * s <= d:
        return torch.linalg.lstsq(flat, target[:, None]).solution.reshape(b, s).argmax(1)
    choice = torch.full((b,), -1, dtype=torch.long)
    chosen: list[int] = []
    residual = target.clone()
    norms = flat.norm(dim=0).clamp_min(1e-30)
    for _ in range(b):
        score = (flat.T @ residual).abs() / norms
        done = choice >= 0
        score.reshape(b, s)[done] = -1                                     # one atom per sequence
        k = int(score.argmax())
        choice[k // s] = k % s
        chosen.append(k)
        coef = torch.linalg.lstsq(flat[:, chosen], target[:, None]).solution
        residual = target - flat[:, chosen] @ coef[:, 0]
    return choice


def last_tokens(view, tensors, gradient, prefixes: torch.Tensor, batch: int | None, tolerance: float):
    """``(tokens (B,) or None, notes)``: the last token of each of ``prefixes`` (B, n - 1)."""
    base = view.prefix + "transformer"
    g_beta, g_gamma = gradient.get(f"{base}.ln_f.bias"), gradient.get(f"{base}.ln_f.weight")
    if g_beta is None or g_gamma is None:
        return None, ["last tokens not recovered: the update holds no gradient of the final LayerNorm (LoRA?)"]
    count = prefixes.shape[0]
    if batch is not None and batch != count:
        return None, [f"last tokens not recovered: {count} distinct prefixes for a batch of {batch}"]
    out_w = tensors.get(view.prefix + "lm_head.weight", tensors[view.embedding_name])
    beta, gamma = tensors[f"{base}.ln_f.bias"], tensors[f"{base}.ln_f.weight"]
    o = view._call(base, tensors, prefixes).last_hidden_state            # (B, n-1, d), after ln_f
    xhat = (o - beta) / gamma
    p = torch.softmax(o @ out_w.T, dim=-1)
    targets = prefixes[:, 1:]                                              # known targets of positions 0..n-3
    n_targets = count * prefixes.shape[1]
    known_beta = (p.sum((0, 1)) @ out_w) - out_w[targets].sum((0, 1))
    known_gamma = ((p @ out_w) * xhat).sum((0, 1)) - (out_w[targets] * xhat[:, :-1]).sum((0, 1))
    # known - n_targets * (true gradient) = the last tokens' sum; the update may be the true gradient
    # times an unknown scale (clipping, a delta's learning rate): its factor alpha is fitted, not assumed
    support, alpha, exact = _pursuit(out_w, known_beta, g_beta, count, tolerance)
    t_gamma = known_gamma - alpha * g_gamma
    last = xhat[:, -1]                                                     # (B, d)
    atoms = out_w[support][None, :, :] * last[:, None, :]                 # (B, |S|, d): W[v] * xhat_b
    choice = _assign(atoms, t_gamma, count)
    tokens = torch.tensor(support, device=prefixes.device)[choice]
    check = (out_w[tokens] * last).sum(0)
    error = float((check - t_gamma).norm() / t_gamma.norm().clamp_min(1e-30))
    approximate = not exact or error > 10 * tolerance
    scale = n_targets / alpha if alpha else float("inf")
    return tokens, [("APPROXIMATE: " if approximate else "") + f"last tokens from the final LayerNorm's gradient: "
                    f"{len(support)} distinct, assignment residual {error:.1e}; the update is {scale:.4g} x the "
                    "gradient of the mean loss"]
