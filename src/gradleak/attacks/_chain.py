"""A model as a chain of affine layers and activations, and each layer's linear system.

R-GAP, COPA, Qian's CNN inversion and the leakage analyser all read a network the same
way: ``x_1 -> L_1 -> sigma_1 -> L_2 -> ... -> L_d -> output``, where each ``L_i`` is an
``nn.Linear`` or ``nn.Conv2d`` (bias optional) and each ``sigma_i`` an elementwise
activation module. :func:`trace_chain` finds that chain with a functional probe forward
pass (hooks removed in ``finally``, the model untouched) and verifies that every module
is fed exactly the previous module's output (so residual connections, pooling or
functional ops in ``forward`` are detected and named, not silently mis-modelled).

For one layer ``z = L(x; W) + b`` and the gradient signal ``g = dL/dz`` of one sample:

- gradient constraints: ``dL/dW = G_g(x)``, linear in ``x`` (``g x^T`` for a linear layer,
  the correlation of ``g`` with the patches of ``x`` for a convolution);
- weight constraints: ``L(x; W) = z - b`` where ``z = sigma^{-1}(next layer's input)``.

:func:`layer_system` assembles the normal equations of both (matrix-free operators,
densified column by column with ``vmap``); padding is handled by taking only the
un-padded input entries as unknowns. :func:`solve_normal` solves them by an eigen-
decomposition, which also gives the numerical rank and condition number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

from ..errors import ConfigError

__all__ = ["ChainLayer", "Chain", "trace_chain", "act_inverse", "act_derivative", "act_known",
           "LayerSystem", "layer_system", "solve_normal", "propagate_signal", "SOLVE_DTYPE"]

SOLVE_DTYPE = torch.float64
RELU_ZERO = 1e-5   # relative size below which a reconstructed ReLU output counts as zero
_ACTIVATIONS = {nn.LeakyReLU: "leaky_relu", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                nn.Identity: "identity"}
_PASS = (nn.Flatten, nn.Unflatten)
PIECEWISE_LINEAR = ("leaky_relu", "relu", "identity")


@dataclass(eq=False)
class ChainLayer:
    """One affine layer of the chain and the activation that follows it."""

    name: str
    module: nn.Module
    kind: str                    # "linear" | "conv2d"
    in_shape: tuple[int, ...]    # one sample, as the layer sees it
    out_shape: tuple[int, ...]
    activation: str = "identity"
    slope: float = 0.0
    has_bias: bool = False

    def param(self, which: str) -> str:
        return f"{self.name}.{which}" if self.name else which

    @property
    def unknowns(self) -> int:
        return math.prod(self.in_shape)

    @property
    def outputs(self) -> int:
        return math.prod(self.out_shape)

    def apply(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``L(x; W)`` without bias, for a batch ``x`` of shape (N, *in_shape)."""
        if self.kind == "linear":
            return F.linear(x, weight)
        m = self.module
        return F.conv2d(x, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def describe(self) -> str:
        m = self.module
        if self.kind == "linear":
            return f"Linear {m.in_features}->{m.out_features}{'' if self.has_bias else ', no bias'}"
        return (f"Conv2d {m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} p{m.padding[0]}"
                f"{'' if self.has_bias else ', no bias'}")


@dataclass
class Chain:
    layers: list[ChainLayer]
    unsupported: list[str] = field(default_factory=list)   # why the model is not a clean chain
    input_shape: tuple[int, ...] = ()

    @property
    def is_chain(self) -> bool:
        return not self.unsupported and bool(self.layers)

    @property
    def homogeneous(self) -> bool:
        """No bias and piecewise-linear activations: scaling the input scales every layer."""
        return all(not l.has_bias and l.activation in PIECEWISE_LINEAR for l in self.layers)


def trace_chain(model: nn.Module, input_shape: tuple[int, ...], params: dict[str, torch.Tensor],
                buffers: dict[str, torch.Tensor]) -> Chain:
    """The affine layers of ``model`` in execution order, and whether it is a plain chain."""
    if input_shape is None:
        raise ConfigError("the input shape is unknown: give it in the ThreatModel (input_shape=(C, H, W)) "
                          "or carry it in the update")
    reference = next(iter(params.values()))
    probe = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0),
                        dtype=reference.dtype).to(reference.device)
    seen: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda mod, inputs, out, name=name: seen.append((name, mod, inputs[0].detach(), out.detach()))))
    try:
        with torch.no_grad():
            output = functional_call(model, (params, {n: b.clone() for n, b in buffers.items()}), (probe,))
    finally:
        for handle in handles:
            handle.remove()
    layers: list[ChainLayer] = []
    unsupported: list[str] = []
    current = probe
    for name, module, x, y in seen:
        label = f"{name or type(module).__name__} ({type(module).__name__})"
        fed = x.shape[0] == 2 and x.numel() == current.numel() and torch.equal(x.reshape(-1), current.reshape(-1))
        if not fed:
            unsupported.append(f"{label} is not fed the previous module's output (a skip connection, pooling or a "
                               "functional operation in forward)")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)
                                                  or module.groups != 1):
                unsupported.append(f"{label}: only ungrouped convolutions with numeric zero padding are modelled")
            layers.append(ChainLayer(name, module, "linear" if isinstance(module, nn.Linear) else "conv2d",
                                     tuple(x.shape[1:]), tuple(y.shape[1:]), has_bias=module.bias is not None))
        elif type(module) in _ACTIVATIONS:
            kind = _ACTIVATIONS[type(module)]
            if not layers or layers[-1].activation != "identity":
                if kind != "identity":
                    unsupported.append(f"{label}: an activation that does not directly follow a linear/conv layer")
            else:
                layers[-1].activation = kind
                layers[-1].slope = float(getattr(module, "negative_slope", 0.0))
        elif isinstance(module, _PASS) or (isinstance(module, nn.Dropout) and (module.p == 0 or not model.training)):
            pass
        else:
            unsupported.append(f"{label}: a {type(module).__name__} layer is not modelled by the layer-wise systems")
        current = y
    if not torch.equal(current.reshape(-1), output.reshape(-1)):
        unsupported.append("the last module's output is not the model output (a functional operation at the end?)")
    return Chain(layers, unsupported, tuple(input_shape))


# ------------------------------------------------------------------ activations
def act_inverse(kind: str, slope: float, a: torch.Tensor) -> torch.Tensor:
    """``sigma^{-1}(a)``; for ReLU only valid where ``a > 0`` (see :func:`act_known`)."""
    if kind == "leaky_relu":
        return torch.where(a > 0, a, a / slope)
    if kind == "sigmoid":
        return torch.logit(a.clamp(torch.finfo(a.dtype).tiny, 1 - torch.finfo(a.dtype).eps))
    if kind == "tanh":
        return torch.atanh(a.clamp(-1 + torch.finfo(a.dtype).eps, 1 - torch.finfo(a.dtype).eps))
    return a


def act_derivative(kind: str, slope: float, a: torch.Tensor) -> torch.Tensor:
    """``sigma'(z)`` written in terms of the output ``a = sigma(z)``."""
    if kind == "leaky_relu":
        return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, slope))
    if kind == "relu":
        return _relu_active(a).to(a.dtype)
    if kind == "sigmoid":
        return a * (1 - a)
    if kind == "tanh":
        return 1 - a * a
    return torch.ones_like(a)


def _relu_active(a: torch.Tensor) -> torch.Tensor:
    """ReLU outputs that are positive beyond the rounding of a reconstruction (an exact zero
    reconstructed as +1e-16 must not count as active)."""
    return a > RELU_ZERO * a.abs().max().clamp_min(torch.finfo(a.dtype).tiny)


def act_known(kind: str, a: torch.Tensor) -> torch.Tensor:
    """Where the pre-activation can be read back from the output (ReLU loses ``z <= 0``)."""
    return _relu_active(a) if kind == "relu" else torch.ones_like(a, dtype=torch.bool)


def propagate_signal(upper: ChainLayer, upper_weight: torch.Tensor, upper_signal: torch.Tensor,
                     lower: ChainLayer, lower_output: torch.Tensor) -> torch.Tensor:
    """``dL/dz`` of ``lower`` from the signal of the layer above: ``L_upper^T g_upper * sigma'``."""
    zero = torch.zeros((1, *upper.in_shape), dtype=upper_signal.dtype, device=upper_signal.device)
    _, back = vjp(lambda x: upper.apply(upper_weight, x), zero)
    (into,) = back(upper_signal.reshape(1, *upper.out_shape))
    a = lower_output.reshape(lower.out_shape)
    return into.reshape(lower.out_shape) * act_derivative(lower.activation, lower.slope, a)


# ------------------------------------------------------------- linear systems
@dataclass
class LayerSystem:
    """Normal equations ``N x = r`` of one layer's gradient + weight constraints (solve dtype)."""

    normal: torch.Tensor        # (n, n)
    rhs: torch.Tensor           # (n,)
    unknowns: int
    gradient_rows: int          # number of gradient constraints (entries of dL/dW)
    weight_rows: int            # number of weight constraints kept (known pre-activations)
    scale_b: float              # squared norm of the right-hand side, for residuals


def _conv_matrices(layer: ChainLayer, W: torch.Tensor, g: torch.Tensor | None, chunk: int = 1024):
    """Dense operators of a convolution over its un-padded input.

    Returns ``Lt`` (n, m): the weight map transposed (row j = L(e_j)), and ``Bt`` (HW, o*kh*kw):
    the gradient map of ONE input channel transposed; the gradient map is the same for every
    input channel, so its normal matrix is block diagonal with blocks ``Bt Bt^T``.
    """
    m = layer.module
    C, H, Wd = layer.in_shape
    n = C * H * Wd
    eye = torch.eye(n, dtype=W.dtype, device=W.device)
    Lt = torch.cat([layer.apply(W, eye[i : i + chunk].reshape(-1, C, H, Wd)).reshape(-1, layer.outputs)
                    for i in range(0, n, chunk)])
    Bt = None
    if g is not None:
        one = torch.eye(H * Wd, dtype=W.dtype, device=W.device).reshape(-1, 1, H, Wd)
        patches = F.unfold(one, m.kernel_size, m.dilation, m.padding, m.stride)       # (HW, kk, P)
        gmat = g.reshape(m.out_channels, -1)                                            # (o, P)
        Bt = torch.einsum("op,jkp->jok", gmat, patches).reshape(H * Wd, -1)
    return Lt, Bt


def layer_system(layer: ChainLayer, weight: torch.Tensor, weight_grad: torch.Tensor | None,
                 signal: torch.Tensor | None, target: torch.Tensor | None, known: torch.Tensor | None) -> LayerSystem:
    """The least-squares system of R-GAP for one layer, in ``SOLVE_DTYPE``.

    ``signal`` = dL/dz (out_shape), ``target`` = z - b (out_shape), ``known`` = mask of the
    weight constraints to keep. Pass ``weight_grad=None`` / ``target=None`` to leave one
    family out (Qian's CNN inversion uses the weight constraints alone). The gradient
    constraints are divided by ``||g||`` so that both families have unit-size operators.
    """
    dt = SOLVE_DTYPE
    W = weight.to(dt)
    n = layer.unknowns
    use_grad = weight_grad is not None and signal is not None and bool(signal.abs().sum() > 0)
    g = signal.to(dt).reshape(-1) if use_grad else None
    gnorm = float(torch.linalg.vector_norm(g)) if use_grad else 1.0
    normal = torch.zeros(n, n, dtype=dt, device=W.device)
    rhs = torch.zeros(n, dtype=dt, device=W.device)
    scale_b = 0.0
    if layer.kind == "linear":
        if use_grad:
            gw = weight_grad.to(dt) / gnorm
            normal += torch.eye(n, dtype=dt, device=W.device)
            rhs += gw.T @ (g / gnorm)
            scale_b += float(gw.pow(2).sum())
        Lt = W.T if target is not None else None
    else:
        Lt, Bt = _conv_matrices(layer, W, g if use_grad else None)
        if use_grad:
            Bt = Bt / gnorm
            gw = weight_grad.to(dt) / gnorm                        # (o, C, kh, kw)
            block = Bt @ Bt.T
            hw = block.shape[0]
            per_channel = gw.transpose(0, 1).reshape(gw.shape[1], -1)   # (C, o*kk)
            for c in range(layer.in_shape[0]):
                normal[c * hw : (c + 1) * hw, c * hw : (c + 1) * hw] += block
                rhs[c * hw : (c + 1) * hw] += Bt @ per_channel[c]
            scale_b += float(gw.pow(2).sum())
    rows = 0
    if target is not None:
        keep = (known if known is not None else torch.ones(layer.out_shape, dtype=torch.bool)).reshape(-1).to(W.device)
        t = target.to(dt).reshape(-1)[keep]
        Lk = Lt[:, keep]
        normal += Lk @ Lk.T
        rhs += Lk @ t
        scale_b += float(t.pow(2).sum())
        rows = int(keep.sum())
    return LayerSystem(normal, rhs, n, weight.numel() if use_grad else 0, rows, scale_b)


@dataclass
class Solution:
    x: torch.Tensor          # (n,) in SOLVE_DTYPE
    rank: int
    deficit: int             # unknowns - rank
    condition: float         # sqrt(lambda_max / lambda_min_kept) of N: the condition number of the system
    residual: float          # relative least-squares residual


def _extreme_eigenvalues(normal: torch.Tensor, factor: torch.Tensor, steps: int = 30) -> tuple[float, float]:
    """Largest eigenvalue by power iteration, smallest by inverse iteration on the Cholesky factor."""
    v = torch.ones(normal.shape[0], 1, dtype=normal.dtype, device=normal.device)
    w = v.clone()
    top = low = 0.0
    for _ in range(steps):
        v = normal @ v
        top = float(torch.linalg.vector_norm(v))
        v = v / top
        w = torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, w, upper=False),
                                          upper=True)
        low = 1.0 / float(torch.linalg.vector_norm(w))
        w = w * low
    return top, low


def solve_normal(system: LayerSystem, *, rtol: float = 1e-10) -> Solution:
    """Least-squares solution of ``N x = r``; eigenvalues below ``rtol * lambda_max`` count as rank deficit.

    Full-rank systems are solved by Cholesky (condition from power/inverse iteration);
    rank-deficient ones by an eigendecomposition, giving the minimum-norm solution.
    """
    normal, rhs = system.normal, system.rhs
    factor, info = torch.linalg.cholesky_ex(normal)
    if int(info) == 0:
        top, low = _extreme_eigenvalues(normal, factor)
        if low > rtol * top * 10:
            x = torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(
                factor, rhs[:, None], upper=False), upper=True)[:, 0]
            return Solution(x, system.unknowns, 0, math.sqrt(top / low), _residual(system, x))
    values, vectors = torch.linalg.eigh(normal)
    top = float(values[-1]) if values.numel() else 0.0
    keep = values > rtol * max(top, torch.finfo(values.dtype).tiny)
    rank = int(keep.sum())
    coeff = (vectors.T @ rhs) / torch.where(keep, values, torch.ones_like(values))
    x = vectors @ torch.where(keep, coeff, torch.zeros_like(coeff))
    condition = math.sqrt(top / float(values[keep][0])) if rank else math.inf
    return Solution(x, rank, system.unknowns - rank, condition, _residual(system, x))


def _residual(system: LayerSystem, x: torch.Tensor) -> float:
    """Relative residual ``||Ax - b|| / ||b||`` from ``x^T N x - 2 x^T r + ||b||^2``."""
    res2 = float(x @ system.normal @ x - 2 * x @ system.rhs) + system.scale_b
    return math.sqrt(max(res2, 0.0) / system.scale_b) if system.scale_b > 0 else 0.0
