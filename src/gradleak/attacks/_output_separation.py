"""Each image's output gradient, classifier features and label, separated out of a batch's classifier gradient.

A softmax cross-entropy classifier layer ``z = W h + b`` receives, from a FedSGD gradient of a
batch of ``B`` images (mean loss), the gradients

    dL/dW = sum_i u_i h_i^T,     dL/db = sum_i u_i,     u_i = (softmax(W h_i + b) - e_{y_i}) / B,

a rank-``B`` matrix whose factors are each image's output gradient ``u_i`` and its features
``h_i`` (the input to the classifier layer). Instance-wise label restoration (Ma et al. 2023,
"Instance-wise Batch Label Restoration via Gradients in Federated Learning", ICLR) reads the
batch's per-instance probabilities off this structure; here the factors are recovered whole.
Where the ``u_i`` are linearly independent, the column space of ``dL/dW`` is their span and its
row space the features' span: ``h_i = V a_i`` with ``V`` the top ``B`` right singular vectors,
which leaves ``B`` unknowns per image, and ``a_i`` fixes ``u_i`` through the model's own softmax.

1. Each label's images are roots of a scale-free condition of their own (:func:`_label_residual`):
   the output gradient of ``V a`` under that label lies in the column space, as a direction, with
   the label entry free. Scale-free, so an image classified with ``1 - p = 1e-6`` counts as much as
   one at ``1e-3``; the label entry free, because a float32 client rounds ``p_y`` near 1 to a
   multiple of 2^-24. Found by Levenberg-Marquardt from the best of 65,536 sampled points; a label
   with no root is absent (residuals ~1e-8 against > 0.1 on trained digit networks), which gives
   the labels when they are not granted.
2. The multiplicities (every way to give ``B`` images the present labels) and the factors come
   from the joint equations ``sum_i u_i [a_i, 1] = [dW V, db]`` (:func:`_residual`, with each
   image's label entry scaled by a fitted ``1 + delta_i`` for the rounding above), solved by
   Levenberg-Marquardt from the roots; an image left without a root (the second of a label, whose
   basin the first one's swallows) starts from the remainder the others leave (:func:`_peel`).

Recovered to ~1e-7 relative from float32 updates of a trained digit ConvNet (``1 - p`` from 6e-6
to 1e-3) and to ~1e-12 from float64 ones. Valid for a FedSGD gradient (not a delta of several
local steps) of a mean softmax cross-entropy loss, a biased linear classifier layer whose output
is the model output, and ``B < C`` images whose output gradients are linearly independent (an
image classified with ``1 - p`` near the update's float precision leaves ``s_B`` within 10x of
``s_{B+1}``, the update's rounding, as do two images of one label on an untrained network, whose
``u_i`` are nearly equal); refused, naming the condition, otherwise, and so is a fit whose residual
exceeds a tenth of the weakest image's part (its factors and label are not determined: such fits
returned wrong labels on memorised batches). With the ``u_i`` known, the gradient-matching engine
matches ``sum_i J_i(x'_i)^T u_i`` (``output_gradient="separated"``, :mod:`._separated`): every
candidate gets its own image's exact output gradient, which the observed bias gradient gives only
for batches of one, and ``features > 0`` compares each candidate with its image's features.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch.func import jacrev

from ..errors import AttackNotApplicable, ConfigError

__all__ = ["OutputSeparation", "SeparationNotFitted", "separate_output_gradients"]


class SeparationNotFitted(AttackNotApplicable):
    """The search found no factors that explain the classifier gradient well enough (as opposed to
    an update the separation cannot hold at all): more starts may find them."""


@dataclass(frozen=True)
class OutputSeparation:
    """The per-image factors of a classifier layer's batch gradient (float64)."""

    output_gradients: torch.Tensor   # (B, C): u_i at the update's scale; their sum is the bias gradient
    features: torch.Tensor           # (B, d): h_i, each image's input to the classifier layer
    labels: torch.Tensor             # (B,): the labels the fit used, in the order of the rows above
    residual: float                  # relative residual of the fit over [dW V, db]
    singular_ratio: float            # s_B / s_1 of dW: how far from rank-deficient the batch is

    def shares(self) -> torch.Tensor:
        """Each image's part of the classifier layer's gradient: ``|u_i| |[h_i, 1]|`` over their sum."""
        sizes = self.output_gradients.norm(dim=1) * (self.features.square().sum(1) + 1).sqrt()
        return sizes / sizes.sum()


def _factors(x, WV, bias, Y, batch):
    """``u`` (B, C): the output gradients of features ``V a``, ``a = x[:, :B]``; a further column of
    ``x`` scales each label entry ``p_y - 1`` by ``1 + x[:, B]``: a float32 client rounds ``p_y`` near 1
    to a multiple of 2^-24, so that entry of a confident image is known only to ~6e-8 absolutely
    (``docs/models.md``: 1 - p below float32's epsilon), while the others keep their relative precision."""
    B = WV.shape[1]
    u = ((x[:, :B] @ WV.T + bias).softmax(-1) - Y) / batch
    return u * (1 + x[:, B:] * Y) if x.shape[1] > B else u


def _residual(x, WV, bias, Y, M, db):
    u = _factors(x, WV, bias, Y, x.shape[0])
    return torch.cat([(u.T @ x[:, :WV.shape[1]] - M).reshape(-1), u.sum(0) - db])


def _label_residual(a, WV, bias, complement, label):
    """One image's condition: its output gradient ``softmax(WV a + b) - e_y`` lies in the span of the
    batch's output gradients (the column space of ``dW``), as a direction (scale-free: confident
    images weigh as much as the others) and with its label entry free (a float32 client's ``p_y - 1``
    is rounded, :func:`_factors`). ``complement``: an orthonormal basis of that span's complement;
    ``a``: one coefficient vector or a stack of them (leading dimensions)."""
    q = (a @ WV.T + bias).softmax(-1)
    is_label = torch.arange(q.shape[-1], device=q.device) == label
    wrong = torch.where(is_label, 0.0, q)
    off = wrong.sum(-1, keepdim=True)                                  # 1 - q_y, kept exact
    residual = (wrong @ complement) / off.clamp_min(1e-300)
    free = complement[label]                                           # the label entry's direction, projected out
    residual = residual - (residual @ free)[..., None] * free / (free @ free).clamp_min(1e-300)
    return torch.where(off > 1e-250, residual, 1.0)                  # a softmax saturated to 1 has no direction


def _levenberg_marquardt(residual, a, args, scale, iterations: int, tol: float):
    """Minimise ``|residual(a, *args)|`` from ``a``; returns (a, relative residual)."""
    r = residual(a, *args)
    cost = float(r.square().sum())
    mu = 1e-3
    for _ in range(iterations):
        if cost ** 0.5 <= tol * scale:
            break
        J = jacrev(residual)(a, *args).reshape(r.numel(), -1)
        JtJ, g = J.T @ J, J.T @ r
        step = torch.linalg.solve(JtJ + mu * torch.diag(JtJ.diagonal().clamp_min(1e-300)), -g)
        trial = a + step.reshape(a.shape)
        r_trial = residual(trial, *args)
        trial_cost = float(r_trial.square().sum())
        if trial_cost < cost:
            a, r, cost, mu = trial, r_trial, trial_cost, max(mu / 10, 1e-15)
        else:
            mu *= 10
            if mu > 1e12:
                break
    return a, cost ** 0.5 / scale


def _label_roots(label: int, count: int, scale: float, WV, bias, complement, starts: int, generator,
                 samples: int = 1 << 16) -> list[tuple[float, torch.Tensor]]:
    """``count`` distinct feature coefficients ``a`` whose output gradient, under ``label``, lies in
    the batch's span (:func:`_label_residual`): the residual on ``samples`` random points (directions
    uniform, norms log-uniform over ``scale`` x [0.03, 30]), then Levenberg-Marquardt from the best
    ``starts`` of them that lie apart; the best ``count`` found as ``(residual, a)``, best first."""
    B = WV.shape[1]
    directions = torch.randn((samples, B), generator=generator, dtype=WV.dtype).to(WV.device)
    norms = scale * 10 ** (3 * torch.rand((samples, 1), generator=generator, dtype=WV.dtype).to(WV.device) - 1.5)
    points = directions / directions.norm(dim=1, keepdim=True) * norms
    order = _label_residual(points, WV, bias, complement, label).norm(dim=1).argsort()
    roots: list[tuple[float, torch.Tensor]] = []
    tried: list[torch.Tensor] = []
    for index in order[:64 * starts]:
        a0 = points[index]
        if any(float((a0 - t).norm()) < 0.1 * float(t.norm()) for t in tried):
            continue
        tried.append(a0)
        a, rel = _levenberg_marquardt(_label_residual, a0, (WV, bias, complement, label), 1.0, 60, 1e-14)
        if all(float((a - b).norm()) > 1e-2 * float(b.norm()) for _, b in roots):   # one root, reached twice
            roots.append((rel, a))
        if len(tried) >= starts:
            break
    return sorted(roots, key=lambda item: item[0])[:count]


LABEL_TOLERANCE = 1e-2   # a label is present where some output gradient in the span fits it this well (direction)
SPARE_ROOTS = 3          # roots kept per label beyond its images: spurious ones fit as well as the update's rounding
FIT_NOISE = 100.0        # a fit is accepted up to this many times the update's rounding (s_{B+1}/s_1), at most tol
SEPARABLE = 10.0         # s_B must stand this far above s_{B+1} (the update's rounding) for B images to separate
PART_MARGIN = 0.1        # the fit's relative residual must stay under this fraction of every image's part
LABEL_SETS_RANKED = 64   # label multisets searched for root combinations, the best by their roots' residuals
LABEL_SETS_FITTED = 6    # label multisets fitted jointly, the best by their starting residual
# early exits, as fractions of ``tol``: a fit this far under it is at the update's rounding
START_EXIT = 1e-3        # no other start of the joint fit can do better (and at most 1e-10: float64 fits go further)
LABELS_EXIT = 1e-2       # no other label multiset can do better (a wrong one fits ~1e-2 at best)


def _joint_fit(initial, args, scale, starts: int, iterations: int, tol: float, generator):
    """The factors ``a`` of all images together (:func:`_residual`) from ``initial`` and perturbations
    of it; returns (a, relative residual) of the best start."""
    best = None
    for k in range(starts):
        noise = torch.randn(initial.shape, generator=generator, dtype=initial.dtype).to(initial.device)
        start = initial if k == 0 else initial * (1 + 0.3 * noise) + 0.1 * noise * initial.norm(dim=1, keepdim=True)
        start = torch.cat([start, torch.zeros_like(start[:, :1])], dim=1)   # the label entries' rounding: none yet
        a, rel = _levenberg_marquardt(_residual, start, args, scale, iterations, 1e-14)
        if best is None or rel < best[1]:
            best = (a, rel)
        if rel <= min(tol * START_EXIT, 1e-10):
            break
    return best


def _peel(a, args, missing: list[int], sweeps: int = 3):
    """Gauss-Seidel over the ``missing`` images: image ``k``'s coefficients from what the others
    leave of ``[dW V, db]`` (one image's exact ratio, iDLG's, on that remainder): exact for one
    missing image when the others are. Starts the images no root was found for (a second image of
    a label, whose root's basin the first one's swallows)."""
    WV, bias, Y, M, db = args
    B = a.shape[0]
    target = torch.cat([M, db[:, None]], dim=1)
    a = a.clone()
    for _ in range(sweeps if len(missing) > 1 else 1):
        for k in missing:
            u = _factors(a, WV, bias, Y, B)
            rest = [j for j in range(B) if j != k]
            remainder = target - u[rest].T @ torch.cat([a[rest], torch.ones(B - 1, 1, dtype=a.dtype,
                                                                              device=a.device)], dim=1)
            row = remainder[int(Y[k].argmax())]
            if row[B].abs() > 0:
                a[k] = row[:B] / row[B]
    return a


def _typical_size(M, db) -> float:
    """The size of a feature coefficient vector, from iDLG's ratio ``|dW_c V| / |db_c|`` (one image's
    features exactly) over the classes: its median over the classes whose bias gradient is nonzero
    (a class whose softmax underflowed to 0 for every image, or a pruned entry, has none); 1 where
    none is."""
    nonzero = db != 0
    if not bool(nonzero.any()):
        return 1.0
    return float((M[nonzero] / db[nonzero, None]).norm(dim=1).median())


def _label_sets(present: list[int], batch: int, given: torch.Tensor | None, roots: dict) -> list[list[int]]:
    """The label multisets to try: the given labels, else every multiset of ``batch`` labels drawn
    from the ``present`` ones (a spurious root can make an absent label look present, so none is
    required); where there are more than :data:`LABEL_SETS_RANKED`, the best of them by
    :func:`_set_score` (a confident network's batch can make every label look present: 715 sets at
    batch 4 of 10 classes, each a search over root combinations)."""
    if given is not None:
        return [given.long().tolist()]
    sets = [list(labels) for labels in itertools.combinations_with_replacement(sorted(present), batch)]
    if len(sets) > LABEL_SETS_RANKED:
        sets = sorted(sets, key=lambda label_set: _set_score(roots, label_set))[:LABEL_SETS_RANKED]
    return sets


def _set_score(roots: dict, label_set: list[int]) -> float:
    """A label multiset's cheap rank, lower first: the log residuals of the roots its images would take
    (each label's best ones, as many as it has images); an image without a root of its own, or one of
    a repeated label (which may be peeled instead, :func:`_peel`), counts at most :data:`LABEL_TOLERANCE`."""
    score = 0.0
    for label in set(label_set):
        need = label_set.count(label)
        found = [residual for residual, _ in roots.get(label, [])][:need]
        taken = found + [LABEL_TOLERANCE] * (need - len(found))
        if need > 1:
            taken[-1] = min(taken[-1], LABEL_TOLERANCE)
        score += sum(math.log10(max(residual, 1e-300)) for residual in taken)
    return score


def _rank_and_tolerance(s: torch.Tensor, B: int, tol: float) -> tuple[float, float, float]:
    """From the singular values ``s`` of ``dW``: ``s_B / s_1``, the fit's tolerance (``tol``, tightened
    to :data:`FIT_NOISE` times the update's own rounding ``s_{B+1} / s_1``, no tighter than
    ``tol`` x :data:`LABELS_EXIT`) and the residual that ends the search for labels. Refuses where
    ``s_B`` is within :data:`SEPARABLE` of ``s_{B+1}``: the B-th image is at the update's rounding."""
    ratio = float(s[B - 1] / s[0]) if s[0] > 0 else 0.0
    floor = float(s[B]) if s.numel() > B else 0.0                     # the update's rounding, where rank is B
    if ratio < 1e-12 or s[B - 1] < SEPARABLE * floor:
        raise AttackNotApplicable(f"output separation: the classifier weight gradient has no clear rank {B} "
                                  f"(s_{B}/s_1 = {ratio:.1e}, s_{B}/s_{B + 1} = {float(s[B - 1]) / max(floor, 1e-300):.1e} "
                                  f"< {SEPARABLE:g}): some image's output gradient is at the update's rounding (a "
                                  "confident image's 1 - p near 0) or two images' are nearly equal (one label on "
                                  "an untrained network), so their factors are not determined",
                                  condition="per-image output gradients clearly independent")
    at_rounding = tol * LABELS_EXIT                                   # a fit this good ends the search for labels
    return ratio, min(tol, max(FIT_NOISE * floor / float(s[0]), at_rounding)), at_rounding


def separate_output_gradients(weight_grad: torch.Tensor, bias_grad: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor, labels: torch.Tensor | None = None, *, batch: int | None = None,
                              starts: int = 16, iterations: int = 200, tol: float = 1e-4,
                              seed: int = 0) -> OutputSeparation:
    """Separate a batch's classifier gradient ``(weight_grad (C, d), bias_grad (C,))`` of the layer
    ``(weight, bias)`` into each image's output gradient and features (module docstring: Ma et al.
    2023's instance-wise factorisation, solved by Levenberg-Marquardt). ``labels``: the batch's
    ``B`` labels where known; else (``batch=B``) they are found too: a label is present where an
    output gradient in the batch's span fits it (a scale-free condition, :func:`_label_residual`),
    and the multiplicities are the ones whose joint fit is best. ``tol``: the largest relative
    residual accepted (1e-4 suits a float32 update, which fits to ~1e-7; a float64 one fits to ~1e-12), tightened
    to :data:`FIT_NOISE` times the update's own rounding ``s_{B+1} / s_1`` (no tighter than ``tol / 100``):
    wrong labels fitted a memorised batch to 7e-5 where the right ones fit to 2e-8. Raises
    :class:`AttackNotApplicable` naming the failed condition."""
    C, d = weight_grad.shape
    B = int(labels.numel()) if labels is not None else int(batch or 0)
    if weight.shape != (C, d) or bias.shape != (C,) or bias_grad.shape != (C,):
        raise AttackNotApplicable(f"output separation: the classifier gradient {tuple(weight_grad.shape)} / "
                                  f"{tuple(bias_grad.shape)} does not fit its layer {tuple(weight.shape)} / "
                                  f"{tuple(bias.shape)}", condition="a biased linear classifier layer")
    if labels is not None and labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < C):
        raise ConfigError(f"output separation: labels must lie in [0, {C}) for {C} classes, got {labels.tolist()}")
    if not 1 <= B < C:
        raise AttackNotApplicable(f"output separation needs fewer images than classes: {B} images, {C} classes "
                                  "(the output gradients of B >= C images are linearly dependent)",
                                  condition="batch size < number of classes")
    dW, db = weight_grad.detach().double(), bias_grad.detach().double()
    W, b = weight.detach().double(), bias.detach().double()
    if not all(bool(torch.isfinite(t).all()) for t in (dW, db, W, b)):
        raise AttackNotApplicable("output separation: the classifier layer or its gradient holds NaN or infinite "
                                  "values", condition="finite classifier weights and gradients")
    U, s, Vh = torch.linalg.svd(dW, full_matrices=True)
    ratio, tol, at_rounding = _rank_and_tolerance(s, B, tol)
    V, complement = Vh[:B].T, U[:, B:]                                # features' span; output gradients' complement
    M, WV = dW @ V, W @ V
    scale = float(torch.cat([M.reshape(-1), db]).norm())
    typical = _typical_size(M, db)
    generator = torch.Generator().manual_seed(seed)
    candidates = labels.long().unique().tolist() if labels is not None else list(range(C))
    roots = {}
    for label in candidates:                                          # each label's own condition first
        count = int((labels.long() == label).sum()) if labels is not None else B
        roots[label] = _label_roots(label, count + SPARE_ROOTS, typical, WV, b, complement, starts, generator)
    present = [label for label, found in roots.items() if found and found[0][0] <= LABEL_TOLERANCE]
    ranked = []
    for label_set in _label_sets(present, B, labels, roots):          # then all of them together
        Y = torch.nn.functional.one_hot(torch.tensor(label_set), C).double().to(dW.device)
        args = (WV, b, Y, M, db)
        choices = _root_choices(roots, label_set, args, scale)
        if choices:
            ranked.append((choices[0][0], label_set, args, choices))
    best = None
    for _, label_set, args, choices in sorted(ranked, key=lambda item: item[0])[:LABEL_SETS_FITTED]:
        for _, initial in choices[:3]:
            a, rel = _joint_fit(initial, args, scale, max(1, starts // 3), iterations, tol, generator)
            if best is None or rel < best[1]:
                best = (a, rel, label_set, args)
            if rel <= tol:
                break
        if best is not None and best[1] <= at_rounding:
            break
    if best is None or not best[1] <= tol:
        found = "no label fits" if best is None else f"relative residual {best[1]:.1e} > {tol:.1e}"
        raise SeparationNotFitted(f"output separation: no per-image factors explain the classifier gradient "
                                  f"({found}; labels present: {present}; s_{B}/s_1 = {ratio:.1e}): the labels or the "
                                  "batch size are wrong, the update is not a plain mean softmax gradient, or an "
                                  "image's output gradient is at the update's rounding (1 - p = 0 in float32: an "
                                  "image the network has memorised)",
                                  condition="a FedSGD softmax cross-entropy gradient with the right labels")
    a, rel, label_set, args = best
    sep = OutputSeparation(_factors(a, *args[:3], B), a[:, :B] @ V.T, torch.tensor(label_set, device=dW.device), rel,
                           ratio)
    weakest = float(sep.shares().min())
    if rel > PART_MARGIN * weakest:
        raise SeparationNotFitted(f"output separation: the fit's relative residual {rel:.1e} is more than "
                                  f"{PART_MARGIN:g} of the weakest image's part of the classifier gradient "
                                  f"({weakest:.1e}; labels {label_set}): that image's factors and label are not "
                                  "determined by the update (a confident image's 1 - p near the update's rounding)",
                                  condition="every image's part of the update well above the fit's residual")
    return sep


def _root_choices(roots: dict, label_set: list[int], args, scale: float,
                  limit: int = 4096) -> list[tuple[float, torch.Tensor]]:
    """Starting coefficients ``(B, B)`` for the joint fit with their residuals, best first: each label's
    images take distinct roots of that label that fit its condition (:data:`LABEL_TOLERANCE`), or all
    but one of them (a spurious root can fit as well as a true one); the images left without one are
    peeled off the remainder (:func:`_peel`)."""
    unique = sorted(set(label_set))
    per_label = []
    for label in unique:
        good = [a for residual, a in roots.get(label, []) if residual <= LABEL_TOLERANCE]
        need = label_set.count(label)
        per_label.append([picked for size in range(min(len(good), need), max(0, need - 1) - 1, -1)
                          for picked in itertools.combinations(good, size)])   # one image peeled instead
    choices = []
    for combo in itertools.islice(itertools.product(*per_label), limit):
        chosen = {label: list(picked) for label, picked in zip(unique, combo)}
        rows, missing = [], []
        for k, label in enumerate(label_set):
            if chosen[label]:
                rows.append(chosen[label].pop(0))
            else:
                rows.append(torch.zeros_like(args[3][0]))
                missing.append(k)
        initial = torch.stack(rows)
        if missing:
            initial = _peel(initial, args, missing)
        choices.append((float(_residual(initial, *args).norm()) / scale, initial))
    return sorted(choices, key=lambda item: item[0])
