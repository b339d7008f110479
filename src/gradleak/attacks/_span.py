"""The linear algebra of the span attacks (DAGER, Petrov et al., NeurIPS 2024): a basis of the
inputs a linear layer's weight gradient reveals, and the distance of candidate inputs to it.

For y = x W (+ b) over a batch of N inputs, dL/dW = X^T dL/dY: every column of the gradient is
a combination of the inputs x_1..x_N, so its column space is (generically exactly) their span,
of rank <= N. When N < d (the input width) a vector lies in that span only if it is one of the
inputs (or a combination of them), which a discrete candidate almost never is by chance: the
test is exact up to float precision. At N >= d the span is the whole space and every candidate
passes: the method fails, and says so.
"""

from __future__ import annotations

import torch

__all__ = ["span_basis", "span_residuals", "default_tolerance"]


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative distance below which a candidate lies in the span: 1e-3 in float32, 1e-7 in float64
    (the exact distance is 0; a wrong candidate's is ~ sqrt(1 - rank/d), far above)."""
    return 1e-7 if dtype == torch.float64 else 1e-3


def span_basis(matrix: torch.Tensor, *, rank_cap: int | None = None, rtol: float | None = None) -> torch.Tensor:
    """(d, r) orthonormal basis of the column space of ``matrix`` (d, m): singular vectors whose
    singular value exceeds ``rtol`` times the largest (default 1e-5 in float32, 1e-11 in
    float64), at most ``rank_cap`` of them (the number of inputs, when the attacker knows it)."""
    rtol = rtol if rtol is not None else (1e-11 if matrix.dtype == torch.float64 else 1e-5)
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    rank = int((s > s[0] * rtol).sum())
    if rank_cap is not None:
        rank = min(rank, int(rank_cap))
    return u[:, :rank]


def span_residuals(basis: torch.Tensor, vectors: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """||z - P z|| / ||z|| for each row z of ``vectors`` (..., d), P the projector on ``basis``."""
    flat = vectors.reshape(-1, vectors.shape[-1]).to(basis.dtype)
    out = torch.empty(flat.shape[0], dtype=basis.dtype, device=basis.device)
    for start in range(0, flat.shape[0], chunk):
        z = flat[start:start + chunk]
        outside = z - (z @ basis) @ basis.T      # direct, not sqrt(|z|^2 - |Pz|^2): keeps float32 precision
        out[start:start + chunk] = outside.norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-30)
    return out.reshape(vectors.shape[:-1])
