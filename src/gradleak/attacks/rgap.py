"""R-GAP: recursive gradient attack on privacy (Zhu & Blaschko, arXiv 2010.07733).

The network is solved from the output back to the input, one layer at a time:

1. **Last layer** (:func:`rgap_last_layer`): from ``dL/dW_d = g x_d^T`` and the known label.
   Binary head (one logit, no bias, the paper's setting): with ``t = mu z`` (``mu = 2y - 1``)
   the relation ``w . dL/dw = g z`` becomes ``-t / (1 + e^t) = w . dL/dw``, a scalar
   equation for the logit; then ``x_d = dL/dw / g``. For ``w . dL/dw < 0`` it has two
   roots; in a bias-free piecewise-linear network both give consistent reconstructions
   that differ by a scale, and the one that lies in the image box is kept (reported).
   Multi-class softmax head without bias (K >= 3): ``dL/dW = alpha c x^T`` with known
   ``c``; for ``j != y``, ``log|c_j| = (W x)_j / alpha + const``, a regression that gives
   ``alpha``. A head with bias gives ``g = dL/db`` directly (the FC-bias relation).
2. **Each layer below** (:func:`rgap_layer`): with the signal ``g_i = L_{i+1}^T g_{i+1} *
   sigma'(z_i)`` and ``z_i = sigma^{-1}(x_{i+1})`` known, stack the gradient constraints
   ``dL/dW_i = G_{g_i}(x_i)`` and the weight constraints ``L_i(x_i) = z_i - b_i``
   (a convolution written as a matrix over the un-padded input: the padding constraints)
   and solve by least squares.

Conditions of validity: one sample (batch size 1); a chain of linear/conv layers with
invertible activations (LeakyReLU, sigmoid, tanh; ReLU loses the weight constraints of
inactive units); the label known (granted, or read from the sign pattern of a K >= 3
head). Exact when every layer's system has full column rank; :func:`rank_analysis`
(the paper's RA) counts constraints against unknowns per layer, and the attack reports
each layer's numerical rank deficit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AttackNotApplicable
from ..limits import check_bool, check_float
from ..threat import ThreatModel
from ..update import SharedUpdate
from ._chain import (SOLVE_DTYPE, Chain, ChainLayer, act_inverse, act_known, layer_system, propagate_signal,
                     solve_normal, trace_chain)
from .analytic import default_rank_tolerance, fc_bias_inversion
from .base import Attack, Reconstruction, register_attack, require_single_sample

__all__ = ["RGAP", "rgap_last_layer", "rgap_layer", "rgap_recursion", "rank_analysis", "LayerRank",
           "binary_logit_roots"]


def binary_logit_roots(s: float) -> list[float]:
    """All ``t`` with ``-t / (1 + e^t) = s`` (``t = mu z``): one root for s >= 0, two for s < 0, none below the minimum."""
    f = lambda t: -t / (1 + math.exp(t)) if t < 700 else 0.0  # noqa: E731

    def bisect(lo, hi):
        flo = f(lo) - s
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if (f(mid) - s) * flo > 0:
                lo, flo = mid, f(mid) - s
            else:
                hi = mid
        return 0.5 * (lo + hi)

    if s >= 0:
        hi = -1.0
        while f(hi) < s:
            hi *= 2
        return [bisect(hi, 0.0)] if s > 0 else [0.0]
    t_star = 1.2784645427610738  # argmin of f: 1 + e^t - t e^t = 0
    if s < f(t_star):
        return []
    far = t_star * 2
    while f(far) < s and far < 700:
        far *= 2
    return [bisect(0.0, t_star), bisect(t_star, far)]


@dataclass
class LastLayer:
    candidates: list[tuple[torch.Tensor, torch.Tensor]]   # (x_d, g_d) pairs, most plausible first
    label: int
    note: str
    approximate: bool = False     # the classifier gradient was not rank one: a best rank-one estimate


def rgap_last_layer(weight: torch.Tensor, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None,
                    loss: str, label: int | None, *, robust: bool = False) -> LastLayer:
    """The classifier layer's input ``x_d`` and signal ``g_d = dL/dz_d`` from its gradient and the label.

    ``robust``: a classifier gradient that is not rank one (perturbed by a defense) gives the
    best rank-one estimate (its top singular pair), marked ``approximate``, instead of
    :class:`AttackNotApplicable`."""
    dt = SOLVE_DTYPE
    W, dW = weight.to(dt), weight_grad.to(dt)
    if bias_grad is not None and bool((bias_grad != 0).any()):
        inv = fc_bias_inversion(weight_grad.to(dt), bias_grad.to(dt), layer="the classifier layer",
                                rank_tol=default_rank_tolerance(weight_grad.dtype), robust=robust)
        g = bias_grad.to(dt)
        found = int(g.argmin()) if label is None else label
        return LastLayer([(inv.x, g)], found, "last layer: g = dL/db (classifier with bias)" + (
            f"; APPROXIMATE: best rank-one estimate (residual {inv.rank_one_residual:.2e})" if inv.approximate else ""),
            inv.approximate)
    if not bool(dW.abs().sum() > 0):
        raise AttackNotApplicable("the classifier gradient is zero: nothing to start the recursion from",
                                  condition="non-zero classifier gradient")
    if W.shape[0] == 1:
        if loss != "binary_cross_entropy":
            raise AttackNotApplicable(f"a one-logit head needs the binary_cross_entropy loss, not {loss!r}",
                                      condition="binary head with BCE loss")
        if label is None:
            raise AttackNotApplicable("a binary head without bias does not reveal the label (the sign of p - y is "
                                      "not observable): grant it with ThreatModel(labels_known=True)",
                                      condition="label known (binary head without bias)")
        mu = 2 * label - 1
        s = float(W[0] @ dW[0])
        roots = binary_logit_roots(s)
        if not roots:
            raise AttackNotApplicable(f"w . dL/dw = {s:.3g} is below the minimum of -t/(1+e^t): the gradient is not "
                                      "that of one sample with this label", condition="single sample, known label")
        out = []
        for t in roots:
            z = mu * t
            g = torch.sigmoid(torch.tensor(z, dtype=dt)) - label
            out.append((dW[0] / g, g.reshape(1).to(W.device)))
        note = "last layer: binary logit from -t/(1+e^t) = w.dL/dw" + (
            f" ({len(roots)} roots, t = {', '.join(f'{t:.4g}' for t in roots)})" if len(roots) > 1 else "")
        return LastLayer(out, label, note)
    if loss != "cross_entropy":
        raise AttackNotApplicable(f"a {W.shape[0]}-output head needs the cross_entropy loss, not {loss!r}")
    if W.shape[0] < 3:
        raise AttackNotApplicable("a 2-class softmax head without bias leaves the logit scale unresolved by "
                                  "this closed form; use one logit (binary head) or K >= 3 classes",
                                  condition="K >= 3 classes, or a binary head, or a classifier bias")
    j = int(dW.norm(dim=1).argmax())
    r = dW[j]
    c = dW @ r / (r @ r)                      # dW = c r^T (rank one for one sample)
    residual = float(torch.linalg.vector_norm(dW - torch.outer(c, r)) / torch.linalg.vector_norm(dW))
    approximate = residual > default_rank_tolerance(weight_grad.dtype)
    if approximate and not robust:
        raise AttackNotApplicable("the classifier gradient is not rank one: it averages several samples",
                                  condition="batch size 1")
    if approximate:                           # the best rank-one fit s u v^T, oriented like row j
        u, sv, vh = torch.linalg.svd(dW, full_matrices=False)
        r = sv[0] * u[j, 0] * vh[0]        # row j of the fit
        c = dW @ r / (r @ r)
    if label is None:
        signs = torch.sign(c)
        minority = [k for k in range(len(c)) if (signs == signs[k]).sum() == 1 and c[k] != 0]
        if len(minority) != 1:
            raise AttackNotApplicable("the label cannot be read from the sign pattern of the classifier gradient",
                                      condition="label known")
        label = minority[0]
    others = [k for k in range(len(c)) if k != label and c[k] != 0]
    a = W @ r
    if len(others) < 2 or float(a[others].std()) == 0:
        raise AttackNotApplicable("fewer than two informative non-label classes: the logit scale is unresolved",
                                  condition="K >= 3 classes with distinct logits")
    design = torch.stack([a[others], torch.ones_like(a[others])], dim=1)
    beta = torch.linalg.lstsq(design, torch.log(c[others].abs())[:, None]).solution[0, 0]
    x = beta * r
    g = c / beta
    return LastLayer([(x, g)], label, "last layer: softmax logit scale from log|c_j| = (Wx)_j/alpha + const" + (
        f"; APPROXIMATE: best rank-one estimate (residual {residual:.2e})" if approximate else ""), approximate)


@dataclass
class LayerRank:
    """R-GAP's rank analysis (RA) of one layer: constraints against unknowns."""

    layer: str
    description: str
    unknowns: int
    weight_constraints: int
    gradient_constraints: int      # effective: the rank bound of the gradient map
    numeric_rank: int | None = None
    condition: float | None = None

    @property
    def ra(self) -> int:
        """Constraints minus unknowns (>= 0: enough constraints for full rank; < 0: a deficit of at least -ra)."""
        return self.weight_constraints + self.gradient_constraints - self.unknowns

    @property
    def deficit(self) -> int:
        if self.numeric_rank is not None:
            return self.unknowns - self.numeric_rank
        return max(0, -self.ra)

    def to_json(self) -> dict:
        return {"layer": self.layer, "description": self.description, "unknowns": self.unknowns,
                "weight_constraints": self.weight_constraints, "gradient_constraints": self.gradient_constraints,
                "ra": self.ra, "numeric_rank": self.numeric_rank, "deficit": self.deficit,
                "condition": self.condition if self.condition is not None and math.isfinite(self.condition) else None}


def _gradient_rank_bound(layer: ChainLayer) -> int:
    if layer.kind == "linear":
        return layer.unknowns            # g x^T with g != 0 determines x
    m = layer.module
    positions = layer.outputs // m.out_channels
    patch = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return min(layer.unknowns, min(m.out_channels, positions) * patch)


def rank_analysis(chain: Chain) -> list[LayerRank]:
    """RA per layer from the architecture alone (counts; ReLU counted as if every unit were active).

    The classifier layer (the last) is solved from its gradient and the label, not by the
    weight constraints; it is full rank whenever its gradient is non-zero.
    """
    rows = []
    for k, layer in enumerate(chain.layers):
        if k == len(chain.layers) - 1:
            rows.append(LayerRank(layer.name, layer.describe(), layer.unknowns, 0, layer.unknowns))
        else:
            rows.append(LayerRank(layer.name, layer.describe(), layer.unknowns, layer.outputs,
                                  _gradient_rank_bound(layer)))
    return rows


def rgap_layer(layer: ChainLayer, weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
               signal: torch.Tensor, output: torch.Tensor, *, use_gradient: bool = True, use_weights: bool = True,
               rtol: float = 1e-10):
    """Solve one layer: its input from its gradient constraints and weight constraints.

    ``output``: this layer's activation output ``sigma(z)`` (reconstructed by the layer
    above); ``signal``: ``dL/dz``. Returns a :class:`~gradleak.attacks._chain.Solution`.
    """
    a = output.to(SOLVE_DTYPE).reshape(layer.out_shape)
    target = known = None
    if use_weights:
        target = act_inverse(layer.activation, layer.slope, a)
        if bias is not None:
            target = target - bias.to(SOLVE_DTYPE).reshape(-1, *([1] * (len(layer.out_shape) - 1)))
        known = act_known(layer.activation, a)
    system = layer_system(layer, weight, weight_grad if use_gradient else None, signal, target, known)
    return solve_normal(system, rtol=rtol)


def rgap_recursion(chain: Chain, params: dict[str, torch.Tensor], gradient: dict[str, torch.Tensor],
                   top_input: torch.Tensor, top_signal: torch.Tensor, *, use_gradient: bool = True,
                   rtol: float = 1e-10):
    """From the classifier's input and signal down to the network input. Returns (x, per-layer ranks)."""
    x, g = top_input, top_signal
    ranks: list[LayerRank] = []
    for k in range(len(chain.layers) - 2, -1, -1):
        layer, upper = chain.layers[k], chain.layers[k + 1]
        g = propagate_signal(upper, params[upper.param("weight")].to(SOLVE_DTYPE), g, layer, x)
        bias = params.get(layer.param("bias")) if layer.has_bias else None
        solution = rgap_layer(layer, params[layer.param("weight")], bias, gradient[layer.param("weight")], g, x,
                              use_gradient=use_gradient, rtol=rtol)
        counts = rank_analysis(Chain([layer, upper]))[0]
        counts.numeric_rank, counts.condition = solution.rank, solution.condition
        ranks.append(counts)
        x = solution.x
    return x.reshape(chain.input_shape), ranks[::-1]


def _box_violation(images: torch.Tensor) -> float:
    return float((images.clamp_max(0).abs() + (images - 1).clamp_min(0)).mean())


@register_attack
class RGAP(Attack):
    """R-GAP, recursive closed-form reconstruction of one input (Zhu & Blaschko 2021)."""

    name = "rgap"
    paper = "Zhu & Blaschko, R-GAP: Recursive Gradient Attack on Privacy, ICLR 2021 (arXiv 2010.07733)"
    conditions = ("batch size 1; a chain of linear/conv layers with invertible activations (LeakyReLU); label known "
                  "(binary head) or K >= 3 classes; exact when every layer's system has full rank (RA)")

    def __init__(self, model, threat: ThreatModel | None = None, *, rtol: float = 1e-10, robust: bool = True):
        super().__init__(model, threat)
        self.rtol = check_float("rtol", rtol)
        self.robust = check_bool("robust", robust)

    def options(self):
        return {**super().options(), "rtol": self.rtol, "robust": self.robust}

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        require_single_sample(update, "R-GAP")
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        chain = trace_chain(self.model, update.input_shape, params, buffers)
        if not chain.is_chain:
            raise AttackNotApplicable("R-GAP needs a chain of linear/conv layers and activations: "
                                      + "; ".join(chain.unsupported), condition="a chain of affine layers")
        head = chain.layers[-1]
        if head.kind != "linear":
            raise AttackNotApplicable("the last layer is not fully connected", condition="a linear classifier layer")
        label = None if update.labels is None else int(update.labels[0])
        last = rgap_last_layer(params[head.param("weight")], gradient[head.param("weight")],
                               gradient.get(head.param("bias")) if head.has_bias else None, update.loss, label,
                               robust=self.robust)
        spec = update.data_spec
        candidates = []
        x, ranks = rgap_recursion(chain, params, gradient, *last.candidates[0], rtol=self.rtol)
        for k, (top_x, top_g) in enumerate(last.candidates):
            if k == 0:
                xk = x
            elif chain.homogeneous:   # every layer scales with the top: no second recursion needed
                xk = x * (last.candidates[0][1].reshape(-1)[0] / top_g.reshape(-1)[0])
            else:
                xk, _ = rgap_recursion(chain, params, gradient, top_x, top_g, rtol=self.rtol)
            xk = xk.reshape(1, *update.input_shape).to(next(iter(gradient.values())).dtype)
            candidates.append(spec.denormalize(xk) if spec is not None else xk)
        best = min(range(len(candidates)), key=lambda k: _box_violation(candidates[k]))
        notes = [last.note]
        if len(candidates) > 1:
            notes.append(f"{len(candidates)} logits fit the last layer; kept candidate {best} (closest to the [0, 1] box)")
        deficient = [r for r in ranks if r.deficit > 0]
        for r in ranks:
            notes.append(f"layer {r.layer!r} ({r.description}): {r.unknowns} unknowns, rank {r.numeric_rank}, "
                         f"RA {r.ra:+d}, condition {r.condition:.3g}")
        if last.approximate:
            notes.append("APPROXIMATE: the gradient is perturbed (a defense), so the recursion solves every layer "
                         "in the least-squares sense from a best estimate: not an exact recovery")
        notes.append(("every layer full rank: exact recovery expected" if not last.approximate else
                      "every layer full rank") if not deficient else
                     f"rank deficit in {', '.join(repr(r.layer) for r in deficient)}: the minimum-norm solution is "
                     "returned, exact recovery is not possible from these constraints")
        history = {"rank_deficit": [float(r.deficit) for r in ranks],
                   "log10_condition": [math.log10(r.condition) if math.isfinite(r.condition) else float("nan")
                                       for r in ranks]}
        labels = torch.tensor([last.label], dtype=torch.int64)
        return Reconstruction(images=candidates[best], labels=labels, history=history, notes=notes,
                              config={"ranks": [r.to_json() for r in ranks]})
