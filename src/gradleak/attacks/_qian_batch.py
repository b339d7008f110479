"""The batch machinery of Qian et al.'s inversion (``attacks/qian.py``): separating the
samples of a mean fully-connected gradient, exactly (hyperplanes of inactive units, groups of
agreeing unit rows) and, for perturbed gradients, from its best rank-B approximation."""

from __future__ import annotations

import itertools

import torch

__all__ = ["separate", "isolate", "robust_isolate", "perturbed", "exact_mixture", "ROBUST_TOLERANCES"]


def _clusters(rows: torch.Tensor, tol: float) -> list[list[int]]:
    """Groups of (numerically) identical rows."""
    if rows.shape[0] == 0:
        return []
    norms = torch.linalg.vector_norm(rows, dim=1).clamp_min(torch.finfo(rows.dtype).tiny)
    close = torch.cdist(rows, rows) <= tol * torch.minimum(norms[:, None], norms[None, :])
    seen, groups = set(), []
    for i in range(rows.shape[0]):
        if i in seen:
            continue
        members = [j for j in torch.nonzero(close[i]).reshape(-1).tolist() if j not in seen]
        seen.update(members)
        groups.append(members)
    return groups


def _hyperplanes(M: torch.Tensor, B: int, tol: float, trials: int, seed: int = 0) -> list[torch.Tensor]:
    """Normals of the B hyperplanes of R^B that hold the units inactive for each sample.

    Row j of ``M = dL/dW V`` (V: a basis of the samples' span) is ``sum_i delta_ji c_i``; a
    unit inactive for sample i has ``delta_ji = 0``, so its row lies in the span of the
    other samples' coordinates, a hyperplane whose normal is column i of ``C^{-1}``.
    Found by sampling B-1 rows (RANSAC), refined on all rows within ``tol``.
    """
    rows = M / torch.linalg.vector_norm(M, dim=1, keepdim=True)
    h = rows.shape[0]
    if h < B - 1:
        return []
    generator = torch.Generator().manual_seed(seed)
    normals: list[torch.Tensor] = []
    counts: list[int] = []
    for start in range(0, trials, 2000):
        picks = torch.rand(2000, h, generator=generator).argsort(dim=1)[:, : B - 1]
        basis = rows[picks]                                           # (T, B-1, B)
        candidates = torch.linalg.svd(basis, full_matrices=True).Vh[:, -1]   # (T, B)
        inliers = (rows @ candidates.T).abs() <= tol                  # (h, T)
        score = inliers.sum(0)
        for t in score.argsort(descending=True).tolist():
            if int(score[t]) < B or len(normals) >= 6 * B:
                break
            if any(float((candidates[t] @ n).abs()) > 0.999 for n in normals):
                continue
            members = rows[inliers[:, t]]
            normal = torch.linalg.svd(members, full_matrices=True).Vh[-1]
            if any(float((normal @ n).abs()) > 1 - tol for n in normals):
                continue
            normals.append(normal)
            counts.append(int(((rows @ normal).abs() <= tol).sum()))
        if len(normals) >= B and start >= 4000:
            break
    order = sorted(range(len(normals)), key=lambda k: -counts[k])
    return [normals[k] for k in order]


def separate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int, tol: float,
              trials: int) -> torch.Tensor | None:
    """All B samples from the hyperplane structure of the mean gradient, or None.

    A choice of B normals is accepted only if it is consistent: the recovered samples'
    inactive units (computed from W, b) carry zero signal in ``Delta = M Gamma diag(s)``.
    """
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    V = Vh[:B].T                                                       # (n, B)
    M = dW @ V                                                         # (h, B) = Delta^T C
    keep = torch.linalg.vector_norm(M, dim=1) > S[0] * 1e-9
    normals = _hyperplanes(M[keep], B, tol, trials)
    for combo in itertools.islice(itertools.combinations(range(min(len(normals), B + 10)), B), 2000):
        gamma = torch.stack([normals[k] for k in combo], dim=1)
        if torch.linalg.matrix_rank(gamma) < B:
            continue
        scales = torch.linalg.lstsq(M @ gamma, db[:, None]).solution[:, 0]   # db = sum_i delta_i
        if bool((scales.abs() < 1e-12).any()):
            continue
        delta = M @ gamma * scales                                      # (h, B)
        X = torch.linalg.inv(gamma * scales[None, :]) @ V.T
        inactive = (X @ W.T + b <= 0).T                                  # (h, B)
        worst = float(delta[inactive].abs().max()) if bool(inactive.any()) else 0.0
        if worst <= tol * float(delta.abs().max()):
            return X
    return None


def isolate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int, activation: str,
             tol: float) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Samples isolated by single units: groups of units whose rows ``dW_j / db_j`` agree
    within ``tol``, peeling recovered samples off (ReLU) until ``B`` are found or none is left.
    Units whose weight-gradient row is zero (pruned away) say nothing and are skipped."""
    active = torch.nonzero((db != 0) & (dW != 0).any(dim=1)).reshape(-1)
    ratios = dW[active] / db[active, None]
    found: list[torch.Tensor] = []
    units: list[list[int]] = []
    remaining = torch.ones(active.numel(), dtype=torch.bool)
    for _ in range(B):
        left = B - len(found)
        if left == 0:
            break
        candidates = torch.nonzero(remaining).reshape(-1)
        if found and activation == "relu":   # peel: keep units inactive on every recovered sample
            z = torch.stack(found) @ W[active[candidates]].T + b[active[candidates]]
            candidates = candidates[(z <= 0).all(dim=0)]
        groups = [[int(candidates[k]) for k in g] for g in _clusters(ratios[candidates], tol)]
        minimum = 1 if left == 1 and (activation == "relu" or B == 1) else 2
        groups = [g for g in groups if len(g) >= minimum]
        if not groups:
            break
        new = 0
        for g in sorted(groups, key=lambda g: (len(g), float(db[active[g]].square().sum())), reverse=True)[:left]:
            idx = active[g]
            x = (db[idx] @ dW[idx]) / (db[idx] @ db[idx])
            if any(torch.linalg.vector_norm(x - f) <= tol * torch.linalg.vector_norm(f) for f in found):
                remaining[g] = False
                continue
            found.append(x)
            units.append(idx.tolist())
            remaining[g] = False
            new += 1
        if new == 0:
            break
    return found, units


ROBUST_TOLERANCES = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3)


def robust_isolate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int,
                    activation: str) -> tuple[list[torch.Tensor], list[list[int]], float, float]:
    """Best estimates of the samples from a perturbed gradient (noise, pruning, quantisation).

    The exact gradient ``[dW | db] = sum_i delta_i [x_i, 1]`` has rank <= B; its best rank-B
    approximation (truncated SVD, Eckart-Young) removes the part of the perturbation outside
    that subspace, and the units' rows are then grouped with the tightest tolerance (of
    :data:`ROBUST_TOLERANCES`) that isolates the most samples. (The separating hyperplanes
    of the exact case were tried on the projection too: no better on noisy faces, 2x slower.)
    Where no two rows agree even at the loosest tolerance, the B strongest units (largest
    ``|db|``), each alone, are the estimates. For B = 1 every row of the projection is
    proportional to the top singular vector: the estimate is the best rank-one fit, as in
    :func:`~gradleak.attacks.analytic.rank_one_estimate`. Returns (samples, units, tolerance
    used (inf: single units), relative residual of the rank-B fit)."""
    A = torch.cat([dW, db[:, None]], dim=1)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    k = min(B, S.numel())
    A_k = (U[:, :k] * S[:k]) @ Vh[:k]
    residual = float(torch.linalg.vector_norm(A - A_k) / torch.linalg.vector_norm(A).clamp_min(1e-300))
    dW_k, db_k = A_k[:, :-1], A_k[:, -1]
    # units no sample activates keep only the perturbation's share in the subspace, about
    # sigma sqrt(k) per row (sigma from the residual): those rows are dropped first, kept if
    # nothing is found without them (pruning's residual is structured, not noise)
    h, n = A.shape
    sigma = float(torch.linalg.vector_norm(A - A_k)) / max(h * (n - k), 1) ** 0.5
    informative = torch.linalg.vector_norm(A_k, dim=1) > 10 * sigma * k ** 0.5
    best: tuple[list[torch.Tensor], list[list[int]], float] = ([], [], ROBUST_TOLERANCES[-1])
    for rows in (informative, torch.ones_like(informative)):
        db_rows = torch.where(rows & (db_k.abs() > S[0] * 1e-12), db_k, torch.zeros_like(db_k))
        for tol in ROBUST_TOLERANCES:
            found, units = isolate(dW_k, db_rows, W, b, B, activation, tol)
            if len(found) > len(best[0]):
                best = (found, units, tol)
            if len(found) == B:
                break
        if best[0]:
            break
    if not best[0]:   # no two rows agree even loosely: each of the B strongest units alone, as its own estimate
        order = [int(j) for j in db_k.abs().argsort(descending=True) if db_k[j] != 0]
        found, units = [], []
        for j in order:
            x = dW_k[j] / db_k[j]
            if all(torch.linalg.vector_norm(x - f) > 0.1 * torch.linalg.vector_norm(f) for f in found):
                found.append(x)
                units.append([j])
            if len(found) == B:
                break
        best = (found, units, float("inf"))
    return (*best, residual)


def perturbed(dW: torch.Tensor, db: torch.Tensor, B: int, eps: float) -> bool:
    """Whether ``[dW | db]`` is farther from rank B than rounding explains (a defense perturbed
    it), rather than exact but not separable (sigmoid units, fewer units than samples)."""
    s = torch.linalg.svdvals(torch.cat([dW, db[:, None]], dim=1))
    return float(s[B:].square().sum().sqrt()) > 1e3 * eps * float(s.square().sum().sqrt())


def exact_mixture(found: list[torch.Tensor], dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
           B: int, tol: float) -> bool:
    """Whether the samples :func:`_isolate` found explain the gradient exactly.

    Every unit j's row ``[dW_j, db_j]`` must be a combination of ``[x_i, 1]`` over the found
    samples that activate it (``W_j x_i + b_j > 0``), within ``tol`` overall (rounding: 1000 eps). Entries that are
    exactly zero are left out: pruning zeroes entries and keeps the others exact. A group of
    agreeing rows can be a fixed mixture of samples (units with the same activation pattern
    under a two-class output), which this refutes."""
    if len(found) < B:
        return False
    X = torch.cat([torch.stack(found), torch.ones(len(found), 1, dtype=dW.dtype)], dim=1)   # (B, n+1)
    A = torch.cat([dW, db[:, None]], dim=1)
    active = (torch.stack(found) @ W.T + b > 0).T                                         # (h, B)
    error = torch.zeros((), dtype=dW.dtype)
    for j in range(A.shape[0]):
        keep = A[j] != 0
        if not bool(keep.any()):
            continue
        basis = X[active[j]][:, keep]
        if basis.shape[0] == 0:
            error = error + A[j, keep].square().sum()
            continue
        coefficients = torch.linalg.lstsq(basis.T, A[j, keep][:, None]).solution
        error = error + (basis.T @ coefficients - A[j, keep][:, None]).square().sum()
    return float(error.sqrt()) <= tol * float(torch.linalg.vector_norm(A))
