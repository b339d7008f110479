"""The gradient-matching engine's use of the output separation (:mod:`._output_separation`):
which updates it applies to, what the notes say of it, the targets it gives the objective
(each image's output gradient, its classifier features) and the feature term.

Valid where the separation is: a FedSGD softmax cross-entropy gradient of a biased linear
classifier, every image of the batch reconstructed (no ``carried``)."""

from __future__ import annotations

import torch

from ..errors import AttackNotApplicable
from ._output_separation import OutputSeparation, SeparationNotFitted, separate_output_gradients

RETRY_STARTS = 16        # the engine's second search where 8 starts found no fit (a heuristic: on the sgd-nowd
                         # network's memorised training batch 0, 3, 4, 6, 8 and 24 starts miss the fit, 16 and 32 find it)
# an image under this part of the classifier gradient is barely constrained by the update: on trained
# ConvNets at batch 4, 5 of 42 such held-out digits came back >= 18 dB, 22 of 34 above it (docs/models.md)
SMALL_PART = 0.2


def separation_of(update, head, params, labels: torch.Tensor | None, whole: int, batch: int,
                  option: str = "output_gradient='separated'") -> OutputSeparation:
    """:func:`separate_output_gradients` of ``update``'s classifier layer ``head`` (a ``LinearTrace``)
    at the weights ``params``; ``labels``: the granted ones, or None to find them. Refuses, naming
    ``option`` and the condition, updates and settings where the factorisation does not hold."""
    reason = None
    if update.kind != "gradient":
        reason = "the update is a delta of local steps, not a gradient"
    elif update.loss != "cross_entropy":
        reason = f"the loss is {update.loss!r}, not softmax cross-entropy"
    elif head is None or not head.has_bias or head.param("bias") not in update.tensors \
            or head.param("weight") not in update.tensors:
        reason = "no biased classifier layer's gradient in the update"
    elif batch != whole:
        reason = f"carried={batch} reconstructs part of the batch; the separation needs all {whole} images"
    if reason is not None:
        raise AttackNotApplicable(f"{option}: {reason}",
                                  condition="a FedSGD softmax cross-entropy gradient with a biased classifier layer")
    w, b = head.param("weight"), head.param("bias")
    tol = 1e-4 if update.tensors[w].dtype != torch.float64 else 1e-9
    try:
        return separate_output_gradients(update.tensors[w], update.tensors[b], params[w], params[b], labels,
                                         batch=whole, tol=tol, starts=8)
    except SeparationNotFitted:   # a confident batch's roots can hide from 8 starts (sgd-nowd's memorised images)
        return separate_output_gradients(update.tensors[w], update.tensors[b], params[w], params[b], labels,
                                         batch=whole, tol=tol, starts=RETRY_STARTS)


def separation_note(sep: OutputSeparation, found: bool) -> str:
    """What the notes say of a separation; ``found``: its labels were found, not granted."""
    shares = sep.shares()
    parts = ", ".join(f"{100 * float(s):.0f} %" for s in shares)
    labels = f"labels found with the output gradients: {sep.labels.tolist()}; " if found else ""
    small = [k for k, s in enumerate(shares.tolist()) if s < SMALL_PART]
    warning = "" if not small or len(shares) == 1 else (
        f"; images {small} (labels {sep.labels[small].tolist()}) hold under {100 * SMALL_PART:.0f} % each: the "
        "update constrains them little, expect them least recovered")
    return (f"{labels}output gradients separated per image from the classifier layer (relative residual "
            f"{sep.residual:.1e}; classifier parts {parts}){warning}")


def separated_output_gradient(update, head, params, labels: torch.Tensor | None, whole: int, batch: int,
                              dtype: torch.dtype, features: float = 0.0
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """``output_gradient="separated"`` for the engine: the problem's data entries (``output_gradient``:
    u (B, C); with ``features > 0`` also ``features`` (B, d) and ``feature_map`` (B, C), for
    :func:`feature_mismatch`), the labels in their order and a note (:func:`separation_of`)."""
    sep = separation_of(update, head, params, labels, whole, batch)
    data = {"output_gradient": sep.output_gradients.to(dtype)}
    if features > 0:
        data.update(features=sep.features.to(dtype), feature_map=torch.linalg.pinv(sep.output_gradients.T).to(dtype))
    return data, sep.labels.to(update.tensors[head.param("weight")].device), separation_note(sep, labels is None)


def feature_mismatch(weight_gradient: torch.Tensor, data: dict) -> torch.Tensor:
    """The candidates' mean cosine distance to their images' classifier features, read off the
    simulated classifier weight gradient ``sum_i u_i h(x'_i)^T`` (``(B, d)`` rows by the pseudo-inverse
    of the separated ``u``, no hook needed): ``mean_i 1 - cos(h(x'_i), h_i)``. Scale-free per image,
    so an image holding 1 % of the update weighs as much as one holding 90 %, and free of the common
    factor the engine applies to the candidate's loss (``loss_scaled_to_one``)."""
    candidates = data["feature_map"] @ weight_gradient.reshape(weight_gradient.shape[0], -1)
    return 1 - torch.nn.functional.cosine_similarity(candidates, data["features"], dim=-1, eps=1e-30).mean(-1)
