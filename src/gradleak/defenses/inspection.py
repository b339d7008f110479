"""The client's side of a malicious server: inspect the model received before training on it.

A malicious server changes the model it sends (``gradleak.attacks.malicious``). Both
manipulations modelled there leave traces a client can check with what it has, the model
and its own batch, before it computes anything it would send:

- **imprint module** (Robbing the Fed): a fully connected layer fed the input whose rows
  measure the same direction (pairwise cosine ~ 1) with staggered biases. Honest
  initialisations draw rows independently: their cosines are near 0.
- **trap weights** (Boenisch et al.): a first fully connected layer whose ReLU units fire for
  few of the client's inputs. Honest initialisations (PyTorch's uniform rows, zero-mean
  biases) fire about half of the units for any input (averages 0.32-0.63 over 100 seeds of
  layers of 16 to 1,000 units on faces); the threshold 0.25 catches traps up to rate 0.2.
- **fishing** (Wen et al.): a classifier layer whose rows are zero for every class but the
  target. No initialisation, and no trained model in practice, has a row of exact zeros.
- **corrupted transformer** (Decepticons, Fowl et al.): feed-forward layers whose units all
  measure one direction (the imprint, moved into the transformer), attentions with zero queries
  and keys (uniform attention writing a sequence signature), a token embedding with coordinates
  that are zero for every token. Honest initialisations and trained transformers have none of
  these (``benchmarks/inspection_text.py``).

``inspect_model`` returns the findings in words; the ``inspect-model`` defense refuses to
train (no update is sent) when there are any. Thresholds and their false-positive rates on
honest initialisations: ``benchmarks/inspection.py`` and ``docs/malicious.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AttackNotApplicable
from .base import Defense, positive, register_defense

__all__ = ["inspect_model", "transformer_findings", "ModelInspection", "ClientRefused"]


class ClientRefused(AttackNotApplicable):
    """The client inspected the model it received and refused to train on it."""


def _input_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Linear]]:
    from ..attacks._layers import trace_linear_layers

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    modules = dict(model.named_modules())
    return [(t.name, modules[t.name]) for t in trace_linear_layers(model, input_shape, params, buffers)
            if t.receives_model_input]


def _classifier(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Linear] | None:
    from ..attacks._layers import classifier_layer, trace_linear_layers

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    head = classifier_layer(trace_linear_layers(model, input_shape, params, buffers))
    return None if head is None else (head.name, dict(model.named_modules())[head.name])


def _duplicate_rows(weight: torch.Tensor, cosine: float) -> int:
    """How many rows have another row pointing the same way (cosine above ``cosine``)."""
    rows = weight.detach().double()
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-30)
    similarity = rows @ rows.T
    similarity.fill_diagonal_(0)
    return int((similarity > cosine).any(dim=1).sum())


def transformer_findings(model: nn.Module, *, max_duplicate_fraction: float = 0.1, cosine: float = 0.99) -> list[str]:
    """Findings about a text model (GPT-2, BERT) the client received: feed-forward layers whose units
    duplicate one direction (Decepticons' imprint), attentions whose queries and keys are zero
    (uniform attention: its sequence signature), a token embedding with coordinates that are zero
    for every token (tokens and positions in separate coordinates)."""
    from ..attacks._decepticons_model import block_paths, embedding_paths, weight_in_out
    from ..text.arch import TransformerView

    view = TransformerView(model)
    findings = []
    for k in range(view.layers):
        paths = block_paths(view, k)
        units = weight_in_out(model.get_submodule(paths["fc_in"])).detach().T      # (units, in)
        duplicates = _duplicate_rows(units, cosine)
        if duplicates > max_duplicate_fraction * units.shape[0]:
            findings.append(f"block {k}'s feed-forward layer: {duplicates} of {units.shape[0]} units measure the same "
                            "direction as another (an imprint: Decepticons?)")
        if view.decoder:
            qk = weight_in_out(model.get_submodule(paths["qkv"])).detach()[:, : 2 * view.width]
        else:
            qk = torch.cat([model.get_submodule(paths[p]).weight.detach() for p in ("query", "key")])
        if not bool(qk.abs().max() > 0):
            findings.append(f"block {k}'s attention: queries and keys are zero, every token attends uniformly (a "
                            "sequence signature: Decepticons?)")
    table = model.get_submodule(embedding_paths(view)["token"]).weight.detach()
    zero = int((table == 0).all(dim=0).sum())
    if zero > 0.1 * table.shape[1]:
        findings.append(f"token embedding: {zero} of {table.shape[1]} coordinates are zero for every token (tokens "
                        "and positions kept in separate coordinates: Decepticons?)")
    return findings


def inspect_model(model: nn.Module, inputs: torch.Tensor, *, max_duplicate_fraction: float = 0.1,
                  min_firing_rate: float = 0.25, cosine: float = 0.99) -> list[str]:
    """Findings (empty: nothing suspicious) about ``model`` on the client's ``inputs`` (as
    the model sees them, i.e. normalized): fully connected layers fed the input with more
    than ``max_duplicate_fraction`` of their rows duplicating another's direction (imprint),
    or whose units fire for less than ``min_firing_rate`` of the inputs on average (traps), and
    a classifier layer with rows of zeros (fishing). A text model (token ids in) is checked by
    :func:`transformer_findings`."""
    from ..text.models import text_task

    if text_task(model) is not None:
        return transformer_findings(model, max_duplicate_fraction=max_duplicate_fraction, cosine=cosine)
    findings = []
    for name, layer in _input_layers(model, tuple(inputs.shape[1:])):
        duplicates = _duplicate_rows(layer.weight, cosine)
        if duplicates > max_duplicate_fraction * layer.out_features:
            findings.append(f"{name}: {duplicates} of {layer.out_features} rows measure the same direction as "
                            "another row (an imprint module?)")
        if layer.bias is not None:
            with torch.no_grad():
                pre = inputs.flatten(1).to(layer.weight) @ layer.weight.T + layer.bias
            rate = float((pre > 0).double().mean())
            if rate < min_firing_rate:
                findings.append(f"{name}: its units fire for {100 * rate:.1f} % of my inputs on average (below "
                                f"{100 * min_firing_rate:g} %: trap weights?)")
    head = _classifier(model, tuple(inputs.shape[1:]))
    if head is not None and head[1].out_features > 1:
        zero = int((head[1].weight.detach() == 0).all(dim=1).sum())
        if zero:
            findings.append(f"{head[0]}: {zero} of {head[1].out_features} classifier rows are zero (fishing for "
                            "one class?)")
    return findings


@register_defense
@dataclass(frozen=True)
class ModelInspection(Defense):
    """The client inspects the model it received (imprint modules, trap weights, fishing; a corrupted
    transformer for text models) and refuses
    to train on a manipulated one: no update is sent. Parameters: ``max_duplicate_fraction``
    (rows of an input layer allowed to share a direction), ``min_firing_rate`` (average
    fraction of a first layer's units firing on the client's inputs)."""

    max_duplicate_fraction: float = 0.1
    min_firing_rate: float = 0.25

    name = "inspect-model"
    paper = ("the client's check against Fowl et al. 2022 (imprint), Boenisch et al. 2023 (trap weights), "
             "Wen et al. 2022 (fishing) and Fowl et al. 2023 (Decepticons)")
    stage = "client"

    def __post_init__(self):
        positive(self.name, "max_duplicate_fraction", self.max_duplicate_fraction, allow_zero=True)
        positive(self.name, "min_firing_rate", self.min_firing_rate, allow_zero=True)

    def inspect(self, model: nn.Module, inputs: torch.Tensor) -> None:
        """Raise :class:`ClientRefused` naming what was found; return quietly otherwise."""
        findings = inspect_model(model, inputs, max_duplicate_fraction=self.max_duplicate_fraction,
                                 min_firing_rate=self.min_firing_rate)
        if findings:
            raise ClientRefused("the client inspected the model it received and refused to train on it: "
                                + "; ".join(findings), condition="the client accepts the model it receives")
