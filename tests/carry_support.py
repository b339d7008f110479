"""What the tests of carried images share: a batch of four digits whose update ``k`` of them carry."""

from __future__ import annotations

import torch
from torch import nn

import gradleak as gl


def batch_carried_by(k: int, size: int = 16):
    """Four digits: ``k`` of distinct classes, then ``4 - k`` of one further class that the classifier is pushed to
    with certainty (its bias + 30), so that the first ``k`` images carry the update. Returns (model, images, labels)."""
    from gradleak.data import load_builtin

    d = load_builtin("digits", n=64, size=size)
    classes: list[int] = []
    for v in d.labels.tolist():
        if v not in classes:
            classes.append(v)
    carriers, confident = classes[:k], classes[k]
    idx = [d.labels.tolist().index(c) for c in carriers]
    idx += [i for i in range(64) if int(d.labels[i]) == confident][:4 - k]
    torch.manual_seed(0)
    model = gl.build_model("mlp", (1, size, size), 10, hidden=[64]).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias[confident] += 30.0
    return model, d.images[idx], d.labels[idx]
