"""Closed-form inversion of a fully connected layer with bias.

For a layer ``z = W x + b`` and any loss L, the chain rule gives
``dL/dW = (dL/dz) x^T`` and ``dL/db = dL/dz`` for one sample, so every row j with
``dL/db_j != 0`` satisfies ``row_j(dL/dW) = dL/db_j * x``: the layer's input is
``x = row_j(dL/dW) / dL/db_j``. (Phong/Aono et al. 2017, "Privacy-preserving deep learning:
revisited and enhanced"; Geiping et al. 2020, "Inverting Gradients", Prop. D.1; the
exercise of seed 000, Problem 1.2.)

Conditions of validity:
- the layer has a bias and at least one ``dL/db_j != 0`` (some unit is active and the loss
  is not saturated); when every ``dL/db_j`` is zero the gradient carries nothing about x;
- the gradient comes from ONE sample (or a single-step delta of one sample): a batch mean
  ``sum_i dL/dz_i x_i^T / B`` is not rank one and each ratio mixes the samples. The method
  checks rank one (the relative residual of the best rank-one fit) and refuses otherwise.

All valid rows are combined by least squares, ``x = sum_j db_j row_j(dW) / sum_j db_j^2``,
which weights each unit by the size of its bias gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttackNotApplicable, ConfigError
from ..limits import check_bool, check_float, short_repr
from ..threat import ThreatModel
from ..update import SharedUpdate
from ._layers import LinearTrace, classifier_layer, trace_linear_layers
from .base import Attack, Reconstruction, register_attack, require_single_sample
from .labels import idlg_label

__all__ = ["FCInversion", "fc_bias_inversion", "FCBiasInversion"]


@dataclass(frozen=True)
class FCInversion:
    """The result of :func:`fc_bias_inversion`.

    x: the recovered layer input (in_features,).
    active_units: indices j with dL/db_j != 0.
    rank_one_residual: ||dW - db x^T||_F / ||dW||_F (0 up to rounding for one sample).
    unit_deviation: for each active unit, ||row_j(dW)/db_j - x|| / ||x||, ordered by |db_j| descending.
    approximate: the gradient was not rank one (noise, pruning, quantisation, or several
        samples) and ``x`` is the best rank-one estimate, not an exact recovery.
    """

    x: torch.Tensor
    active_units: torch.Tensor
    rank_one_residual: float
    unit_deviation: torch.Tensor
    approximate: bool = False


def default_rank_tolerance(dtype: torch.dtype) -> float:
    return 1000 * torch.finfo(dtype).eps


def rank_one_estimate(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The best rank-one fit of ``[dW | db]`` in the least-squares sense (its top singular
    pair ``s u v^T``): the layer input ``x = v[:-1] / v[-1]`` that a single sample would have
    sent. For one sample's exact gradient this is the closed form's ``x``; for a perturbed
    gradient (noise, pruning, quantisation) it is the estimate that fits it best."""
    matrix = torch.cat([weight_grad, bias_grad[:, None]], dim=1).double()
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    v = vh[0]
    if v[-1] == 0:
        raise AttackNotApplicable("the best rank-one fit has no bias component: no input can be estimated",
                                  condition="a rank-one fit with a non-zero bias component")
    return (v[:-1] / v[-1]).to(weight_grad.dtype)


def fc_bias_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor, *, rank_tol: float | None = None,
                      layer: str = "the layer", robust: bool = False) -> FCInversion:
    """Recover the input of a fully connected layer from its weight and bias gradients.

    ``weight_grad``: (out_features, in_features); ``bias_grad``: (out_features,). Raises
    :class:`AttackNotApplicable` when every bias gradient is zero, or when the weight
    gradient is not rank one (a batch of several samples, or a perturbed gradient) beyond
    ``rank_tol`` — unless ``robust``: then the best rank-one estimate
    (:func:`rank_one_estimate`) is returned, marked ``approximate``.
    """
    if weight_grad.ndim != 2 or bias_grad.ndim != 1 or bias_grad.shape[0] != weight_grad.shape[0]:
        raise ConfigError(f"{layer}: weight gradient must be (out, in) and bias gradient (out,), got "
                          f"{tuple(weight_grad.shape)} and {tuple(bias_grad.shape)}")
    dW, db = weight_grad, bias_grad
    active = torch.nonzero(db != 0).reshape(-1)
    if active.numel() == 0:
        raise AttackNotApplicable(
            f"{layer}: every dL/db_j is zero, so the gradient carries no information about the input "
            "(all units inactive, e.g. every ReLU dead, or the loss saturated)",
            condition="some dL/db_j != 0",
        )
    x = (db @ dW) / (db @ db)
    norm_dW = torch.linalg.vector_norm(dW)
    residual = float(torch.linalg.vector_norm(dW - torch.outer(db, x)) / norm_dW) if norm_dW > 0 else 0.0
    tolerance = default_rank_tolerance(dW.dtype) if rank_tol is None else rank_tol
    approximate = residual > tolerance
    if approximate and robust:
        x = rank_one_estimate(dW, db)
    elif approximate:
        raise AttackNotApplicable(
            f"{layer}: the weight gradient is not rank one (relative residual {residual:.3g} > {tolerance:.3g}): "
            "it averages several samples (batch size > 1, or several local steps) or was perturbed (noise, "
            "pruning), and row_j(dW)/db_j no longer gives one input",
            condition="the gradient of a single sample (rank-one weight gradient)",
        )
    order = active[db[active].abs().argsort(descending=True)]
    estimates = dW[order] / db[order, None]
    scale = torch.linalg.vector_norm(x).clamp_min(torch.finfo(x.dtype).tiny)
    deviation = torch.linalg.vector_norm(estimates - x, dim=1) / scale
    return FCInversion(x=x, active_units=order, rank_one_residual=residual, unit_deviation=deviation,
                       approximate=approximate)


@register_attack
class FCBiasInversion(Attack):
    """Closed-form recovery of the input of a fully connected layer with bias.

    ``layer``: the module name of the ``nn.Linear`` to invert; default the first one the
    forward pass runs that has a bias. When that layer is fed the (flattened) model input,
    the result is the image, de-normalized with the data spec; otherwise it is the
    layer's input features (e.g. the features entering a CNN's classifier), returned in
    ``Reconstruction.features``. The label comes with it (iDLG's sign rule) when the
    classifier layer is found and labels are not granted.
    """

    name = "fc-bias"
    paper = "Phong/Aono et al. 2017; Geiping et al. 2020 (arXiv 2003.14053), Prop. D.1"
    conditions = "fully connected layer with bias; one sample (or one per update); some dL/db_j != 0"

    def __init__(self, model, threat: ThreatModel | None = None, *, layer: str | None = None,
                 rank_tol: float | None = None, robust: bool = True):
        super().__init__(model, threat)
        self.robust = check_bool("robust", robust)
        if layer is not None and not isinstance(layer, str):
            raise ConfigError(f"layer must be a layer name, got {short_repr(layer)}")
        self.layer = layer
        self.rank_tol = check_float("rank_tol", rank_tol, optional=True)

    def options(self):
        return {**super().options(), "layer": self.layer, "rank_tol": self.rank_tol, "robust": self.robust}

    def _select_layer(self, traces: list[LinearTrace]) -> LinearTrace:
        if self.layer is not None:
            match = next((t for t in traces if t.name == self.layer), None)
            if match is None:
                raise ConfigError(f"layer {self.layer!r} is not a linear layer the forward pass runs; "
                                  f"linear layers: {[t.name for t in traces]}")
            if not match.has_bias:
                raise AttackNotApplicable(f"layer {self.layer!r} has no bias", condition="the layer has a bias")
            return match
        with_bias = [t for t in traces if t.has_bias]
        if not with_bias:
            raise AttackNotApplicable("the model has no fully connected layer with bias",
                                      condition="a fully connected layer with bias")
        return with_bias[0]

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        require_single_sample(update, "the FC-bias closed form")
        gradient = update.as_gradient()
        params, buffers = self.parameters_at_round(update)
        traces = trace_linear_layers(self.model, update.input_shape, params, buffers)
        target = self._select_layer(traces)
        inversion = fc_bias_inversion(gradient[target.param("weight")], gradient[target.param("bias")],
                                      rank_tol=self.rank_tol, layer=f"layer {target.name!r}", robust=self.robust)
        notes = [
            f"layer {target.name!r}: {inversion.active_units.numel()} of {target.out_features} units have dL/db_j != 0",
            (f"APPROXIMATE: the gradient is not rank one (residual {inversion.rank_one_residual:.2e}: perturbed by a "
             "defense, or several samples); the image is the best rank-one estimate, not an exact recovery"
             if inversion.approximate else f"single sample: rank-one residual {inversion.rank_one_residual:.2e}"),
        ]
        history = {"unit_deviation": inversion.unit_deviation.tolist()}
        images, features = None, {}
        if target.receives_model_input:
            spec = update.data_spec
            x = inversion.x.reshape(1, *update.input_shape)
            images = spec.denormalize(x) if spec is not None else x
            if spec is None:
                notes.append("no data normalization granted: the image is shown as the model saw it")
        else:
            features[target.name] = inversion.x[None]
            notes.append(f"layer {target.name!r} is not fed the raw input: recovered its {target.in_features} "
                         "input features, not an image")
        labels = update.labels
        classifier = classifier_layer(traces)
        if labels is None and classifier is not None:
            bias = gradient.get(classifier.param("bias")) if classifier.has_bias else None
            try:
                labels = idlg_label(gradient[classifier.param("weight")], bias, update.loss)
                notes.append(f"label from the sign of the classifier gradient (iDLG), layer {classifier.name!r}")
            except AttackNotApplicable as reason:
                notes.append(f"label not recovered: {reason}")
        return Reconstruction(images=images, labels=labels, features=features, history=history, notes=notes)
