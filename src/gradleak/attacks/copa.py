"""COPA, combined optimisation attack (Chen & Campbell, arXiv 2111.10178, seed 002; follow-up 2210.13231).

The reconstruction is an optimisation problem per layer, solved backwards from the
output. For layer i with input x_i, the objective combines

- the gradient term ``||G_{g_i}(x_i) - dL/dW_i||^2 / ||dL/dW_i||^2`` (weights and gradients
  of the current layer, with the signal ``g_i`` carried down from the layer above),
- the weight term ``||L_i(x_i) - (z_i - b_i)||^2 / ||z_i - b_i||^2`` with
  ``z_i = sigma^{-1}(x_{i+1})`` from the reconstruction of the subsequent layer,
- optionally the pull-back constraint from the preceding layer: ``x_i`` must be an
  output of ``sigma_{i-1}(L_{i-1}(.) + b_{i-1})``; applied by projecting ``sigma^{-1}(x_i)``
  onto the range of ``L_{i-1}``.

Each layer's objective is quadratic; it is minimised here by conjugate gradients on its
normal equations (the iterations are the attack's history). The layer-wise systems also
give the **security measure** of an architecture (:func:`copa_security`): a layer whose
system is rank deficient cannot be solved (a null space of inputs fits the same
gradient), and an ill-conditioned one amplifies errors. Our scalar reading of the
measure is ``sum_i log10 cond(A_i)`` over the layers, infinite when any layer is rank
deficient, with the worst relative nullity ``deficit_i / unknowns_i`` beside it. (The
papers define the measure from the same layer-wise linear systems; this exact formula
is ours, stated so results can be compared.)

Conditions: a single image, its label known (or a K >= 3 head), a chain of linear /
convolutional layers with invertible activations, as for R-GAP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AttackNotApplicable
from ..limits import MAX_ITERATIONS, check_bool, check_float, check_int
from ..threat import ThreatModel
from ..update import SharedUpdate
from ._chain import (SOLVE_DTYPE, Chain, ChainLayer, act_inverse, act_known, layer_system, propagate_signal,
                     solve_normal, trace_chain)
from .base import Attack, Reconstruction, register_attack, require_single_sample
from .rgap import rgap_last_layer

__all__ = ["COPA", "copa_layer", "copa_security", "CopaSecurity"]


def _conjugate_gradient(normal: torch.Tensor, rhs: torch.Tensor, iterations: int, tol: float):
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = r @ r
    norm0 = float(rr.sqrt()) or 1.0
    history = []
    for _ in range(iterations):
        q = normal @ p
        alpha = rr / (p @ q)
        x = x + alpha * p
        r = r - alpha * q
        new = r @ r
        history.append(float(new.sqrt()) / norm0)
        if history[-1] < tol:
            break
        p = r + (new / rr) * p
        rr = new
    return x, history


def copa_layer(layer: ChainLayer, weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
               signal: torch.Tensor, output: torch.Tensor, *, preceding: ChainLayer | None = None,
               preceding_weight: torch.Tensor | None = None, preceding_bias: torch.Tensor | None = None,
               iterations: int = 2000, tol: float = 1e-13):
    """One layer of COPA: minimise the layer's objective; returns (x_i flat, CG residual history)."""
    a = output.to(SOLVE_DTYPE).reshape(layer.out_shape)
    target = act_inverse(layer.activation, layer.slope, a)
    if bias is not None:
        target = target - bias.to(SOLVE_DTYPE).reshape(-1, *([1] * (len(layer.out_shape) - 1)))
    known = act_known(layer.activation, a)
    system = layer_system(layer, weight, weight_grad, signal, target, known)
    weight_norm2 = float((target.reshape(-1)[known.reshape(-1)] ** 2).sum()) or 1.0
    # layer_system scales the gradient term to ||g||-normalised units; rescale the weight
    # term so both terms are relative errors, as in COPA's objective.
    weight_only = layer_system(layer, weight, None, None, target, known)
    grad_part = system.normal - weight_only.normal
    grad_rhs = system.rhs - weight_only.rhs
    grad_norm2 = max(system.scale_b - weight_only.scale_b, torch.finfo(SOLVE_DTYPE).tiny)
    normal = grad_part / grad_norm2 + weight_only.normal / weight_norm2
    rhs = grad_rhs / grad_norm2 + weight_only.rhs / weight_norm2
    x, history = _conjugate_gradient(normal, rhs, iterations, tol)
    if preceding is not None and preceding_weight is not None:   # pull-back: x must be an output of the layer below
        u = act_inverse(preceding.activation, preceding.slope, x.reshape(preceding.out_shape))
        if preceding_bias is not None:
            u = u - preceding_bias.to(SOLVE_DTYPE).reshape(-1, *([1] * (len(preceding.out_shape) - 1)))
        below = solve_normal(layer_system(preceding, preceding_weight, None, None, u, None))
        z = preceding.apply(preceding_weight.to(SOLVE_DTYPE), below.x.reshape(1, *preceding.in_shape))[0]
        if preceding_bias is not None:
            z = z + preceding_bias.to(SOLVE_DTYPE).reshape(-1, *([1] * (len(preceding.out_shape) - 1)))
        if below.deficit == 0:
            x = _activate(preceding, z).reshape(-1)
    return x, history


def _activate(layer: ChainLayer, z: torch.Tensor) -> torch.Tensor:
    kind = layer.activation
    if kind == "leaky_relu":
        return torch.where(z > 0, z, layer.slope * z)
    if kind == "relu":
        return z.clamp_min(0)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "tanh":
        return torch.tanh(z)
    return z


@dataclass
class CopaSecurity:
    """COPA's security measure of an architecture (at given weights), layer by layer."""

    layers: list[dict]

    @property
    def measure(self) -> float:
        """``sum_i log10 cond(A_i)``; ``inf`` when a layer's system is rank deficient (secure against COPA)."""
        if any(row["deficit"] > 0 for row in self.layers):
            return math.inf
        return sum(math.log10(row["condition"]) for row in self.layers)

    @property
    def nullity(self) -> float:
        return max((row["deficit"] / row["unknowns"] for row in self.layers), default=0.0)

    def to_json(self) -> dict:
        return {"measure": self.measure if math.isfinite(self.measure) else None, "secure": not math.isfinite(self.measure),
                "max_relative_nullity": self.nullity, "layers": self.layers}


def copa_security(chain: Chain, params: dict[str, torch.Tensor], gradient: dict[str, torch.Tensor],
                  top_input: torch.Tensor, top_signal: torch.Tensor) -> CopaSecurity:
    """Rank and condition of every layer-wise system below the classifier, along the true recursion."""
    rows = []
    x, g = top_input.to(SOLVE_DTYPE), top_signal.to(SOLVE_DTYPE)
    for k in range(len(chain.layers) - 2, -1, -1):
        layer, upper = chain.layers[k], chain.layers[k + 1]
        g = propagate_signal(upper, params[upper.param("weight")].to(SOLVE_DTYPE), g, layer, x)
        a = x.reshape(layer.out_shape)
        target = act_inverse(layer.activation, layer.slope, a)
        if layer.has_bias:
            target = target - params[layer.param("bias")].to(SOLVE_DTYPE).reshape(
                -1, *([1] * (len(layer.out_shape) - 1)))
        solution = solve_normal(layer_system(layer, params[layer.param("weight")], gradient[layer.param("weight")],
                                             g, target, act_known(layer.activation, a)))
        rows.append({"layer": layer.name, "description": layer.describe(), "unknowns": layer.unknowns,
                     "rank": solution.rank, "deficit": solution.deficit,
                     "condition": solution.condition if math.isfinite(solution.condition) else None})
        x = solution.x
    return CopaSecurity(rows[::-1])


@register_attack
class COPA(Attack):
    """COPA: layer-wise optimisation from the output back to the input (Chen & Campbell)."""

    name = "copa"
    paper = "Chen & Campbell 2021, Understanding training-data leakage from gradients (arXiv 2111.10178; 2210.13231)"
    conditions = ("single image; label known (or K >= 3 classes); chain of linear/conv layers with invertible "
                  "activations; exact where every layer-wise system is well posed")

    def __init__(self, model, threat: ThreatModel | None = None, *, pullback: bool = True, iterations: int = 2000,
                 tol: float = 1e-13, robust: bool = True):
        super().__init__(model, threat)
        self.pullback, self.robust = check_bool("pullback", pullback), check_bool("robust", robust)
        self.iterations = check_int("iterations", iterations, 1, MAX_ITERATIONS)
        self.tol = check_float("tol", tol)

    def options(self):
        return {**super().options(), "pullback": self.pullback, "iterations": self.iterations, "tol": self.tol,
                "robust": self.robust}

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        require_single_sample(update, "COPA")
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        chain = trace_chain(self.model, update.input_shape, params, buffers)
        if not chain.is_chain or chain.layers[-1].kind != "linear":
            raise AttackNotApplicable("COPA needs a chain of linear/conv layers ending in a linear classifier: "
                                      + "; ".join(chain.unsupported or ["the last layer is not linear"]),
                                      condition="a chain of affine layers")
        head = chain.layers[-1]
        label = None if update.labels is None else int(update.labels[0])
        last = rgap_last_layer(params[head.param("weight")], gradient[head.param("weight")],
                               gradient.get(head.param("bias")) if head.has_bias else None, update.loss, label,
                               robust=self.robust)
        x, g = last.candidates[0]
        history: dict[str, list[float]] = {}
        for k in range(len(chain.layers) - 2, -1, -1):
            layer, upper = chain.layers[k], chain.layers[k + 1]
            g = propagate_signal(upper, params[upper.param("weight")].to(SOLVE_DTYPE), g, layer, x)
            below = chain.layers[k - 1] if (self.pullback and k > 0) else None
            x, curve = copa_layer(
                layer, params[layer.param("weight")], params.get(layer.param("bias")) if layer.has_bias else None,
                gradient[layer.param("weight")], g, x, preceding=below,
                preceding_weight=params[below.param("weight")] if below is not None else None,
                preceding_bias=params.get(below.param("bias")) if below is not None and below.has_bias else None,
                iterations=self.iterations, tol=self.tol)
            history[f"cg_residual[{layer.name}]"] = curve
        dtype = next(iter(gradient.values())).dtype
        image = x.reshape(1, *update.input_shape).to(dtype)
        spec = update.data_spec
        notes = [last.note, f"{len(chain.layers) - 1} layer-wise objectives solved by conjugate gradients"
                 + (", with the pull-back constraint" if self.pullback else "")]
        if len(last.candidates) > 1:
            notes.append("the binary logit has two roots; the first (smaller logit) was used")
        if last.approximate:
            notes.append("APPROXIMATE: the gradient is perturbed (a defense); the layer-wise objectives start from "
                         "the classifier's best rank-one estimate: not an exact recovery")
        return Reconstruction(images=spec.denormalize(image) if spec is not None else image,
                              labels=torch.tensor([last.label]), history=history, notes=notes)
