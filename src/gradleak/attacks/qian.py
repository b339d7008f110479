"""Qian et al., minimal model structure for input reconstruction (arXiv 2010.15718, seed 001).

- **Single input, any depth.** A fully connected layer with bias fed the input gives
  ``x = row_j(dL/dW) / dL/db_j`` for any unit with ``dL/db_j != 0``: one hidden unit
  suffices, whatever comes after it (:func:`~gradleak.attacks.analytic.fc_bias_inversion`).
- **A batch of B** (:func:`qian_batch_inversion`). The mean gradient is
  ``dL/dW = sum_i delta_i x_i^T``, ``dL/db = sum_i delta_i`` (delta_i: the unit signals of
  sample i), so row ratio j is ``sum_i w_ji x_i`` with weights ``w_ji = delta_ji / sum_i
  delta_ji``: a mixture of the samples active at unit j. A unit active for exactly one
  sample (ReLU zeroes the others) gives that sample exactly, and every such unit gives
  the same row: duplicated rows are recovered samples. Recovered samples are then peeled
  off: a unit inactive on every recovered sample mixes only the others, so the search
  repeats on those units; with one sample left, any such unit gives it. This needs at
  least B hidden units (Qian's condition h >= B; the gradient has rank <= h) and units
  that separate the samples; the result says which samples were recovered and which not.
- **Perturbed gradients** (``robust=True``, the default). Noise, pruning or quantisation
  leave no two rows exactly alike; the gradient's best rank-B approximation (truncated SVD)
  removes the perturbation outside the samples' subspace, and its rows are grouped with
  the tightest tolerance that isolates the samples: best estimates, noted APPROXIMATE.
- **CNNs** (:func:`qian_cnn_condition`, :func:`qian_cnn_inversion`). With the input of the
  first fully connected layer recovered as above, each convolution below is inverted from
  its output (weight constraints, least squares). That is exact when the convolution, as
  a matrix, has at least as many outputs as inputs: ``h >= (d/d')^2 C`` kernels for input
  width d, output width d', C input channels, and the activation is invertible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..errors import AttackNotApplicable, ConfigError
from ..limits import check_float, short_repr
from ..threat import ThreatModel
from ..update import SharedUpdate
from ._chain import SOLVE_DTYPE, ChainLayer, act_inverse, act_known, layer_system, solve_normal, trace_chain
from ._layers import trace_linear_layers
from .base import Attack, Reconstruction, register_attack

__all__ = ["QianInversion", "QianBatch", "qian_batch_inversion", "qian_cnn_condition", "QianCNNCheck",
           "qian_cnn_inversion"]


@dataclass
class QianBatch:
    """Result of :func:`qian_batch_inversion`.

    x: (k, in_features) the samples recovered exactly (k <= batch size, order arbitrary).
    units: for each recovered sample, the hidden units that isolate it.
    approximate: the samples are best estimates from a perturbed gradient (``robust``), not exact.
    batch_size: the B used (given, or the rank of dL/dW); rank: numerical rank of dL/dW.
    """

    x: torch.Tensor
    units: list[list[int]]
    batch_size: int
    rank: int
    notes: list[str] = field(default_factory=list)
    approximate: bool = False

    @property
    def complete(self) -> bool:
        return self.x.shape[0] == self.batch_size


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


def _separate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int, tol: float,
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


def _isolate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int, activation: str,
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


def _robust_isolate(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor, B: int,
                    activation: str) -> tuple[list[torch.Tensor], list[list[int]], float, float]:
    """Best estimates of the samples from a perturbed gradient (noise, pruning, quantisation).

    The exact gradient ``[dW | db] = sum_i delta_i [x_i, 1]`` has rank <= B; its best rank-B
    approximation (truncated SVD, Eckart-Young) removes the part of the perturbation outside
    that subspace, and the units' rows are then grouped with the tightest tolerance (of
    :data:`ROBUST_TOLERANCES`) that isolates the most samples. (The separating hyperplanes
    of the exact case were tried on the projection too: no better on noisy faces, 2x slower.) For B = 1 every row of the
    projection is proportional to the top singular vector: the estimate is the best rank-one
    fit, as in :func:`~gradleak.attacks.analytic.rank_one_estimate`. Returns (samples,
    units, tolerance used, relative residual of the rank-B fit)."""
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
            found, units = _isolate(dW_k, db_rows, W, b, B, activation, tol)
            if len(found) > len(best[0]):
                best = (found, units, tol)
            if len(found) == B:
                break
        if best[0]:
            break
    return (*best, residual)


def _perturbed(dW: torch.Tensor, db: torch.Tensor, B: int, eps: float) -> bool:
    """Whether ``[dW | db]`` is farther from rank B than rounding explains (a defense perturbed
    it), rather than exact but not separable (sigmoid units, fewer units than samples)."""
    s = torch.linalg.svdvals(torch.cat([dW, db[:, None]], dim=1))
    return float(s[B:].square().sum().sqrt()) > 1e3 * eps * float(s.square().sum().sqrt())


def _exact(found: list[torch.Tensor], dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
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


def qian_batch_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, *, batch_size: int | None = None, activation: str = "relu",
                         tol: float | None = None, trials: int = 20000, robust: bool = False) -> QianBatch:
    """Recover the inputs of a batch from the mean gradient of a fully connected layer with bias.

    ``weight``/``bias`` are the layer's parameters (to tell which units each recovered
    sample activates). Valid for ReLU layers (inactive units are what separates samples);
    for other activations only a single sample is recovered. Raises
    :class:`AttackNotApplicable` when no sample can be isolated, unless ``robust``: where
    fewer than B samples come out exactly (a gradient perturbed by noise, pruning or
    quantisation), the best estimates from its rank-B approximation are returned, marked
    ``approximate`` (:func:`_robust_isolate`; needs the batch size when the gradient is
    perturbed, since its rank no longer tells it).
    """
    dt = SOLVE_DTYPE
    dW, db = weight_grad.to(dt), bias_grad.to(dt)
    W, b = weight.to(dt), bias.to(dt)
    eps = torch.finfo(weight_grad.dtype).eps
    tol = tol if tol is not None else 10 * eps ** 0.5
    hidden = dW.shape[0]
    s = torch.linalg.svdvals(dW)
    rank = int((s > s[0] * 1e3 * eps).sum()) if s.numel() and s[0] > 0 else 0
    B = batch_size or rank
    notes = [f"{hidden} hidden units, batch of {B}{'' if batch_size else ' (batch size from the rank of dL/dW)'}; "
             f"rank of dL/dW {rank}"]
    if hidden < B:
        notes.append(f"Qian's condition fails: {hidden} hidden units < batch size {B}; at most {hidden} samples "
                     "can be separated")
    active = torch.nonzero(db != 0).reshape(-1)
    if B > 1 and hidden >= B and rank >= B and activation == "relu":
        X = _separate(dW, db, W, b, B, tol, trials)
        if X is not None:
            z = X @ W.T + b
            units = [torch.nonzero(z[i] > 0).reshape(-1).tolist() for i in range(B)]
            notes.append(f"all {B} samples recovered exactly: the units inactive for each sample span a hyperplane "
                         "that separates it from the others")
            return QianBatch(X.to(weight_grad.dtype), units, B, rank, notes)
    if active.numel() == 0:
        raise AttackNotApplicable("every dL/db_j is zero: the gradient carries no information about the inputs",
                                  condition="some dL/db_j != 0")
    found, units = _isolate(dW, db, W, b, B, activation, tol)
    if robust and _perturbed(dW, db, B, eps) and not _exact(found, dW, db, W, b, B, 1e3 * eps):
        estimates, estimate_units, used, residual = _robust_isolate(dW, db, W, b, B, activation)
        if estimates:
            notes.append(f"APPROXIMATE: the gradient is not explained exactly by {B} samples (rank-{B} residual "
                         f"{residual:.2e}: perturbed by a defense, or another batch size); the samples are best "
                         f"estimates from its rank-{B} approximation (rows grouped within {used:g})")
            x = torch.stack(estimates).to(weight_grad.dtype)
            return QianBatch(x, estimate_units, B, rank, notes, approximate=True)
    if not found:
        raise AttackNotApplicable(
            f"no sample of the batch of {B} could be separated ({activation} layer, {hidden} units"
            + (f"; h >= B holds, but about h/2 = {hidden // 2} units are inactive per sample, too few to pin down the "
               f"{B - 1}-dimensional hyperplane that isolates each sample" if hidden >= B and activation == "relu" else "")
            + "): every row of dL/dW mixes several samples", condition="units that separate the samples (ReLU units, enough inactive per sample)")
    x = torch.stack(found).to(weight_grad.dtype)
    if len(found) == B:
        notes.append(f"all {B} samples recovered exactly (each isolated by >= 1 hidden unit)")
    else:
        notes.append(f"recovered {len(found)} of {B} samples exactly; {B - len(found)} not recoverable: no hidden "
                     "unit is active for them alone (their rows of dL/dW stay mixtures)")
    return QianBatch(x, units, B, rank, notes)


@dataclass
class QianCNNCheck:
    """Qian's CNN condition for one convolution: kernels ``h >= (d/d')^2 C``."""

    layer: str
    in_channels: int
    in_width: int
    out_width: int
    kernels: int

    @property
    def required(self) -> float:
        return (self.in_width / self.out_width) ** 2 * self.in_channels

    @property
    def holds(self) -> bool:
        return self.kernels >= self.required - 1e-9

    def describe(self) -> str:
        verdict = "holds" if self.holds else "fails"
        return (f"{self.layer!r}: h = {self.kernels} kernels vs (d/d')^2 C = ({self.in_width}/{self.out_width})^2 x "
                f"{self.in_channels} = {self.required:.3g}: {verdict}")


def qian_cnn_condition(layer: ChainLayer) -> QianCNNCheck:
    """Qian's condition for a convolution ``layer`` of the chain."""
    _, _, d = layer.in_shape
    return QianCNNCheck(layer.name, layer.in_shape[0], d, layer.out_shape[-1], layer.out_shape[0])


def qian_cnn_inversion(layers: list[ChainLayer], params: dict[str, torch.Tensor], features: torch.Tensor,
                       *, rtol: float = 1e-10):
    """Invert the convolutions ``layers`` (input first) from the features their last activation produced.

    Returns (input (C, H, W) in SOLVE_DTYPE, [(check, rank deficit), ...] from input to top).
    """
    x = features.to(SOLVE_DTYPE)
    report = []
    for layer in reversed(layers):
        a = x.reshape(layer.out_shape)
        target = act_inverse(layer.activation, layer.slope, a)
        if layer.has_bias:
            target = target - params[layer.param("bias")].to(SOLVE_DTYPE).reshape(-1, 1, 1)
        system = layer_system(layer, params[layer.param("weight")], None, None, target, act_known(layer.activation, a))
        solution = solve_normal(system, rtol=rtol)
        report.append((qian_cnn_condition(layer), solution.deficit))
        x = solution.x
    return x.reshape(layers[0].in_shape), report[::-1]


@register_attack
class QianInversion(Attack):
    """Closed-form reconstruction of a single input or a batch (Qian et al.)."""

    name = "qian"
    paper = "Qian, Nassar & Hansen 2020, Minimal model structure analysis for input reconstruction in FL (arXiv 2010.15718)"
    conditions = ("a fully connected layer with bias (fed the input, or after convolutions meeting h >= (d/d')^2 C "
                  "with invertible activations); batches: >= B hidden units and ReLU units that isolate each sample; "
                  "a perturbed gradient (noise, pruning) gives best estimates, noted APPROXIMATE (robust=True, "
                  "batch size known)")

    def __init__(self, model, threat: ThreatModel | None = None, *, tol: float | None = None, robust: bool = True):
        super().__init__(model, threat)
        self.tol = check_float("tol", tol, optional=True)
        if not isinstance(robust, bool):
            raise ConfigError(f"robust must be true or false, got {short_repr(robust)}")
        self.robust = robust

    def options(self):
        return {**super().options(), "tol": self.tol, "robust": self.robust}

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        traces = trace_linear_layers(self.model, update.input_shape, params, buffers)
        target = next((t for t in traces if t.has_bias), None)
        if target is None:
            raise AttackNotApplicable("the model has no fully connected layer with bias",
                                      condition="a fully connected layer with bias")
        chain = trace_chain(self.model, update.input_shape, params, buffers)
        names = [l.name for l in chain.layers]
        position = names.index(target.name) if target.name in names else -1
        activation = chain.layers[position].activation if position >= 0 else "relu"
        below = chain.layers[:position] if position > 0 else []
        if not target.receives_model_input and (not chain.is_chain or any(l.kind != "conv2d" for l in below)):
            raise AttackNotApplicable(
                f"the first linear layer with bias ({target.name!r}) is not fed the input and the layers below it are "
                "not a plain chain of convolutions" + (f" ({'; '.join(chain.unsupported)})" if chain.unsupported else ""),
                condition="a fully connected layer with bias fed the input, or by a chain of convolutions")
        batch = qian_batch_inversion(gradient[target.param("weight")], gradient[target.param("bias")],
                                     params[target.param("weight")], params[target.param("bias")],
                                     batch_size=update.batch_size, activation=activation, tol=self.tol,
                                     robust=self.robust and update.batch_size is not None)
        notes = [f"layer {target.name!r}: " + n for n in batch.notes]
        dtype = next(iter(gradient.values())).dtype
        if target.receives_model_input:
            x = batch.x.reshape(-1, *update.input_shape)
        else:
            images, deficits = [], []
            for features in batch.x:
                xi, report = qian_cnn_inversion(below, params, features)
                images.append(xi)
                deficits = report
            x = torch.stack(images).to(dtype)
            for check, deficit in deficits:
                notes.append(f"Qian's CNN condition {check.describe()}; rank deficit of the inversion {deficit}")
            if batch.approximate:
                notes.append("the features are estimates: so are the images inverted from them")
            elif all(check.holds and deficit == 0 for check, deficit in deficits):
                notes.append("every convolution is injective: the images are exact")
            else:
                notes.append("some convolution loses information: the images are minimum-norm estimates, not exact")
        spec = update.data_spec
        images = spec.denormalize(x) if spec is not None else x
        history = {"units_per_sample": [float(len(u)) for u in batch.units]}
        return Reconstruction(images=images, history=history, notes=notes,
                              config={"recovered": int(batch.x.shape[0]), "batch_size": batch.batch_size})
