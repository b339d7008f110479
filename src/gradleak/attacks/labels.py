"""Label recovery from the classifier layer's gradient.

iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): for one sample and
softmax cross-entropy, the classifier bias gradient is ``softmax(z) - onehot(y)``, negative
only at the true class, so ``y = argmin_c dL/db_c``. Without a bias, the weight rows are
``(p_c - y_c) h`` with ``h >= 0`` after ReLU/sigmoid, so the true class is the row with a
negative sum. For one binary sigmoid output, ``dL/db = p - y`` is negative iff ``y = 1``.

Valid for a single sample (batch size 1). Batches: :func:`distinct_labels` (Yin et al. 2021,
non-repeating labels) and :func:`count_labels` (counts, repeated labels included); exact ones
with the separated output gradients (:mod:`._output_separation`). :func:`candidate_labels`
chooses among them for the gradient-matching engine.
"""

from __future__ import annotations

import torch

from ..errors import AttackNotApplicable, ConfigError
from ..functional import forward
from ._separated import separation_note, separation_of

__all__ = ["idlg_label", "distinct_labels", "count_labels", "infer_labels", "candidate_labels"]


def idlg_label(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, loss: str) -> torch.Tensor:
    """The label of a single sample from its classifier gradient; returns a (1,) int64 tensor."""
    if loss == "binary_cross_entropy":
        if bias_grad is None:
            raise AttackNotApplicable("a binary head without bias: the sign of p - y is not observable",
                                      condition="binary classifier layer has a bias")
        return (bias_grad.reshape(-1)[:1] < 0).to(torch.int64)
    if loss == "cross_entropy":
        scores = bias_grad if bias_grad is not None else weight_grad.sum(dim=1)
        if bool((scores == 0).all()):
            raise AttackNotApplicable("the classifier gradient is zero: the loss is saturated",
                                      condition="non-zero classifier gradient")
        return scores.argmin().reshape(1).to(torch.int64)
    raise AttackNotApplicable(f"iDLG label recovery needs cross_entropy or binary_cross_entropy, not {loss!r}")


def distinct_labels(weight_grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The labels of a batch whose labels do not repeat (Yin et al. 2021, "See through
    Gradients: Image Batch Recovery via GradInversion", CVPR, §3.1).

    With softmax cross-entropy the classifier weight gradient is ``dL/dW_mn = (1/B) sum_k
    (p_km - y_km) h_kn``. For features ``h >= 0`` (after a ReLU), a class absent from the batch
    has only non-negative entries, while the row of a present class holds the negative
    ``(p - 1) h`` of its sample, which dominates the row's minimum. So the labels are the B
    classes whose rows have the most negative minimum over the features n. Valid for
    non-negative penultimate features and B distinct labels (B <= number of classes); with
    repeated labels use :func:`count_labels`. Returns the (B,) labels, sorted.
    """
    classes = weight_grad.shape[0]
    if not 1 <= batch_size <= classes:
        raise AttackNotApplicable(f"distinct labels: a batch of {batch_size} cannot have distinct labels among "
                                  f"{classes} classes", condition="batch size <= number of classes")
    minima = weight_grad.reshape(classes, -1).min(dim=1).values
    return torch.sort(torch.argsort(minima)[:batch_size]).values.to(torch.int64)


def _round_counts(estimate: torch.Tensor, batch_size: int, present: torch.Tensor) -> torch.Tensor:
    """Integer counts summing to ``batch_size``, close to ``estimate``, >= 1 where ``present``."""
    counts = torch.zeros_like(estimate, dtype=torch.int64)
    mandatory = torch.nonzero(present).reshape(-1)
    if mandatory.numel() <= batch_size:
        counts[mandatory] = 1
    for _ in range(batch_size - int(counts.sum())):
        counts[int(torch.argmax(estimate - counts.to(estimate.dtype)))] += 1
    return counts


def count_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int,
                 mean_probabilities: torch.Tensor, mean_feature_sum: torch.Tensor | float = 1.0,
                 loss: str = "cross_entropy") -> torch.Tensor:
    """The labels of a batch, repeated labels included, from the classifier gradient.

    For softmax cross-entropy averaged over a batch of B, the classifier bias gradient is
    ``dL/db_c = pbar_c - n_c / B`` with ``pbar_c`` the mean predicted probability and ``n_c``
    the count of class c, so ``n_c = B (pbar_c - dL/db_c)`` (the bias-corrected counting
    of the breaching framework; Wainakh et al. 2022, "User-level label leakage from
    gradients" (LLG), do the same with the weight rows, ``sum_j dL/dW_cj = (pbar_c - n_c/B)
    * mean ||h||_1`` for non-negative features h, used here when there is no bias).
    ``pbar`` and ``mean ||h||_1`` are estimated by the caller from the model on dummy
    inputs (exact when the network's output barely depends on its input, e.g. untrained;
    approximate otherwise). Classes with a negative gradient are always kept (iDLG).
    Counts are rounded greedily to sum to B. Returns the (B,) labels, sorted.
    """
    if loss == "binary_cross_entropy":
        signal = bias_grad.reshape(-1)[:1] if bias_grad is not None else weight_grad.sum(1)[:1] / mean_feature_sum
        ones = int(torch.clamp(torch.round(batch_size * (mean_probabilities.reshape(-1)[:1] - signal)), 0, batch_size))
        return torch.cat([torch.zeros(batch_size - ones, dtype=torch.int64), torch.ones(ones, dtype=torch.int64)])
    if loss != "cross_entropy":
        raise AttackNotApplicable(f"label counting needs cross_entropy or binary_cross_entropy, not {loss!r}")
    signal = bias_grad if bias_grad is not None else weight_grad.sum(dim=1) / mean_feature_sum
    estimate = batch_size * (mean_probabilities.to(signal.dtype) - signal)
    counts = _round_counts(estimate, batch_size, signal < 0)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu())


def infer_labels(model, update, params, buffers, batch: int, head, mode: str, seed: int) -> tuple[torch.Tensor, str]:
    """The labels of ``batch`` images read off the classifier layer ``head`` of ``update`` (a
    ``LinearTrace``): assumed distinct (``mode='distinct'``, Yin et al. 2021), iDLG's sign for one
    image, else :func:`count_labels` with the mean softmax of 64 random probes (seeded by ``seed``)
    as the expected per-image output. Deltas of several local steps are read as ``-delta / (lr K)``.
    Returns the labels and a note saying how they were found."""
    if head is None:
        raise AttackNotApplicable("no linear classifier layer produces the output: labels cannot be inferred",
                                  condition="a linear classifier layer")
    approx = update.as_gradient() if update.kind == "gradient" or update.local_steps == 1 else {
        n: -t / (update.local_lr * update.local_steps) for n, t in update.tensors.items()}
    w_grad = approx[head.param("weight")]
    b_grad = approx.get(head.param("bias")) if head.has_bias else None
    if mode == "distinct" and update.loss == "cross_entropy":
        labels = distinct_labels(w_grad, batch)
        return labels.to(w_grad.device), (f"labels from the classifier weight rows' minima, assumed distinct "
                                          f"(Yin et al. 2021): {labels.tolist()}")
    if batch == 1:
        return idlg_label(w_grad, b_grad, update.loss), "label from the sign of the classifier gradient (iDLG)"
    probe = torch.randn((64, *update.input_shape), generator=torch.Generator().manual_seed(seed),
                        dtype=w_grad.dtype).to(w_grad.device)
    features = {}
    modules = dict(model.named_modules())
    def keep_input(module, inputs, output):
        features["h"] = inputs[0]

    handle = modules[head.name].register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            logits = forward(model, params, buffers, probe)
    finally:
        handle.remove()
    probs = torch.sigmoid(logits).mean(0) if update.loss == "binary_cross_entropy" else logits.softmax(-1).mean(0)
    labels = count_labels(w_grad, b_grad, batch, probs, features["h"].abs().sum(1).mean(), update.loss)
    how = "bias gradient" if b_grad is not None else "weight-row sums (LLG)"
    if update.kind == "delta" and update.local_steps > 1:
        how += f" (approximated by -delta / (lr * {update.local_steps}) for the local steps)"
    return labels.to(w_grad.device), f"labels counted from the classifier {how}: {labels.tolist()}"


def candidate_labels(config, model, update, params, buffers, batch: int, head,
                     partial: bool = False) -> tuple[torch.Tensor | None, str]:
    """The gradient-matching candidate's labels under ``config.labels`` and how they were found
    (``None``: optimised as soft labels, or found with the separated output gradients later, once).
    ``head``: the classifier layer's trace (:func:`._layers.classifier_layer`); ``partial``: ``batch``
    is fewer than the update's images (``carried``), so granted labels cannot be assigned to them and
    are inferred instead."""
    mode = config.labels
    if mode == "given":
        if update.labels is None:
            raise AttackNotApplicable("labels='given' but the threat model grants no labels",
                                      condition="labels known (ThreatModel(labels_known=True))")
        if partial:
            raise ConfigError(f"labels='given' with carried={batch}: which of the batch's granted labels belong to "
                              f"the carried images is not known; use labels='infer'")
        return update.labels, "labels given by the threat model"
    if mode == "optimize":
        return None, "labels optimised jointly as soft labels (DLG)"
    if update.labels is not None and not partial:
        return update.labels, "labels given by the threat model"
    if config.output_gradient == "separated" and mode in ("infer", "separated"):
        return None, ""   # found by the output gradients' separation in the engine's problem, once
    if mode == "separated":   # found with the output gradients, for any objective
        whole = update.batch_size or config.batch_size or batch
        sep = separation_of(update, head, params, None, whole, batch, "labels='separated'")
        return sep.labels, separation_note(sep, True)
    return infer_labels(model, update, params, buffers, batch, head, mode, config.seed)
