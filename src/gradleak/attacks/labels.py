"""Label recovery from the classifier layer's gradient.

iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): for one sample and
softmax cross-entropy, the classifier bias gradient is ``softmax(z) - onehot(y)``, negative
only at the true class, so ``y = argmin_c dL/db_c``. Without a bias, the weight rows are
``(p_c - y_c) h`` with ``h >= 0`` after ReLU/sigmoid, so the true class is the row with a
negative sum. For one binary sigmoid output, ``dL/db = p - y`` is negative iff ``y = 1``.

Valid for a single sample (batch size 1). Batches with repeated labels need a counting
method (Wainakh et al. 2022), which lives beside this one.
"""

from __future__ import annotations

import torch

from ..errors import AttackNotApplicable

__all__ = ["idlg_label"]


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
