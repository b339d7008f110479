"""The exercise's 2-layer network and its gradients in closed form.

Seed 000 (ETH Zurich, Reliable and Trustworthy AI, Exercise 7, Problem 1)::

    z1 = W1 x + b1,  o2 = ReLU(z1),  z2 = w2 . o2 + b2,  p = sigmoid(z2)
    L  = -[y log p + (1 - y) log(1 - p)]            (binary cross-entropy)

Chain rule (Problem 1.1), for one sample::

    dL/dz2  = p - y
    dL/dw2  = (p - y) o2            dL/db2 = p - y
    dL/db1  = (p - y) w2 * 1[z1 > 0]
    dL/dW1  = dL/db1 x^T

so every row j of dL/dW1 is ``dL/db1_j * x`` and (Problem 1.2) ``x = dL/dW1[j] / dL/db1_j``
for any unit j with ``dL/db1_j != 0``: valid when p != y (always, for finite logits),
unit j is active (z1_j > 0) and w2_j != 0, and for a single sample (a batch mean mixes
the samples' rows). :func:`gradleak.attacks.analytic.fc_bias_inversion` implements it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TwoLayerNet", "exercise_gradients"]


class TwoLayerNet(nn.Module):
    """n inputs -> m hidden ReLU units -> one logit (sigmoid/BCE in the loss).

    Images are flattened, so ``in_features`` is C*H*W. The output is the logit z2 of
    shape (B, 1); use it with the ``binary_cross_entropy`` loss.
    """

    def __init__(self, in_features: int, hidden: int = 64):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def exercise_gradients(model: TwoLayerNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Problem 1.1 in closed form: the gradients of the mean BCE over a batch.

    ``x``: inputs as the model sees them (B, ...) (flattened here); ``y``: 0/1 labels (B,).
    Returns tensors keyed like ``model.named_parameters()``.
    """
    x = x.reshape(x.shape[0], -1)
    y = y.to(x.dtype)
    W1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    w2, b2 = model.fc2.weight.detach()[0], model.fc2.bias.detach()[0]
    z1 = x @ W1.T + b1                      # (B, m)
    o2 = z1.clamp_min(0)
    z2 = o2 @ w2 + b2                       # (B,)
    p = torch.sigmoid(z2)
    dz2 = (p - y) / x.shape[0]              # the mean over the batch
    db1_per_sample = dz2[:, None] * w2[None, :] * (z1 > 0).to(x.dtype)  # (B, m)
    return {
        "fc1.weight": db1_per_sample.T @ x,
        "fc1.bias": db1_per_sample.sum(0),
        "fc2.weight": (dz2 @ o2)[None, :],
        "fc2.bias": dz2.sum()[None],
    }
