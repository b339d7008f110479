"""ReLU smoothing by continuation (``MatchingConfig.smooth_relu``): match the observed update
first through a smooth stand-in of the model, then through the model itself.

Why. The matching objective's gradient with respect to the candidate differentiates the
model's parameter gradient once more (double backpropagation). Through a ReLU the second
derivative is zero almost everywhere, so that gradient ignores how the activation pattern
changes with the input: the objective is piecewise, with kinks wherever a unit switches. DLG
(Zhu et al. 2019) asks for twice-differentiable models for this reason and studies sigmoid
networks; seed 004 swaps every ReLU for a sigmoid. Here the swap is only a guide, never the
answer: softplus_beta(z) = log(1 + exp(beta z)) / beta tends to ReLU as beta grows and has a
second derivative everywhere.

The method. Pass 1 runs the configured attack (its schedule, restarts, screening, priors) with
every ReLU of the model replaced by softplus_beta (:func:`gradleak.models.swap_activations`,
parameters shared) against the observed update, which the exact model produced. Pass 2 starts
from pass 1's result and runs the same number of iterations through the exact model at a tenth
of the learning rate (one restart), keeping its best iterate; since that includes its start,
the returned matching loss, the exact model's, is never above pass 1's result. Twice the cost
of one run.

Where it helps (measured, docs/models.md): trained ReLU ConvNets whose objective is rugged at
the truth (the FedAvg-trained faces ConvNet: noise of 0.01 on the true image costs 0.07-0.20 in
1 - cosine). Conditions: a model ``torch.fx`` can trace, with ReLU modules or ``F.relu`` calls;
labels not optimised (pass 2 restarts from pass 1's images only).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..data.spec import DataSpec
from ..models.adapters import swap_activations
from .base import Reconstruction

__all__ = ["relu_continuation"]


def relu_continuation(attack, update) -> Reconstruction:
    """Pass 1 through softplus(beta = ``attack.config.smooth_relu``), pass 2 through the exact
    model from pass 1's images (module docstring); one :class:`Reconstruction` with both passes'
    histories (pass 1's matching losses, the smooth model's, as ``smooth loss``; pass 2's
    iterations numbered after pass 1's) and notes."""
    cfg = attack.config
    smooth = swap_activations(attack.model, "softplus", beta=cfg.smooth_relu, require_relu=True)
    first = type(attack)(smooth, attack.threat, config=replace(cfg, smooth_relu=0.0))
    first._hooks = attack._hooks
    guide = first._reconstruct(update)
    repeated = set(guide.notes)   # pass 2 repeats the label and layer notes: shown once
    guide.notes = [f"pass 1 (every ReLU as softplus, beta {cfg.smooth_relu:g}): {note}" for note in guide.notes]
    guide.history = {(f"smooth {key}" if key.startswith("loss") else key): series for key, series in guide.history.items()}
    if guide.interrupted:   # Ctrl-C in pass 1: its best iterate, marked interrupted
        return guide
    start = (update.data_spec or DataSpec()).normalize(guide.images)   # the candidate space, as _problem defines it
    exact = type(attack)(attack.model, attack.threat, config=replace(
        cfg, smooth_relu=0.0, lr=cfg.lr / 10, restarts=1, screen=None, group=0.0, init="randn"))
    exact._hooks = attack._hooks

    def from_pass_one(group, objective, data, X, Y) -> None:
        with torch.no_grad():
            X.copy_(start.to(X.dtype).to(X.device).expand_as(X))

    exact.initial_candidates = from_pass_one
    result = exact._reconstruct(update)
    history = dict(guide.history)
    for key, series in result.history.items():   # the exact losses stay "loss"; monitors run on through both passes
        merged = history.setdefault(key, {"x": [], "y": []})
        merged["x"] = [*merged["x"], *(cfg.iterations + x for x in series["x"])]
        merged["y"] = [*merged["y"], *series["y"]]
    result.history = history
    result.notes = guide.notes + [f"pass 2 (the exact model, from pass 1's result, lr {cfg.lr / 10:g}): {note}"
                                  for note in result.notes if note not in repeated]
    return result
