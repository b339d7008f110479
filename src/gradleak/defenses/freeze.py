"""Freezing parameters: the client does not train them, so their entries of the update are zero.

For text models the token embedding is the one that matters: its gradient's non-zero rows are
the batch's bag of words (:mod:`gradleak.attacks.text_tokens`). A frozen embedding shares
nothing there (a common fine-tuning choice anyway); the attention layers still train, so the
span attack (``dager``) is untouched. Only the update changes: parameters are matched by name,
a comma-separated list of substrings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..update import SharedUpdate
from .base import ClientContext, Defense, register_defense
from .perturbation import map_tensors

__all__ = ["Freeze", "EMBEDDING_NAMES"]

EMBEDDING_NAMES = "wte.weight,word_embeddings.weight"   # GPT-2's and BERT's token tables


@register_defense
@dataclass(frozen=True)
class Freeze(Defense):
    """Parameters whose name contains one of ``names`` (comma-separated; default: the token
    embedding of GPT-2 and BERT) are not trained: their update entries are zero."""

    names: str = EMBEDDING_NAMES
    name = "freeze"
    paper = "frozen token embeddings (common practice in fine-tuning); against the bag-of-words leak"

    def __post_init__(self):
        if not isinstance(self.names, str) or not [n for n in self.names.split(",") if n.strip()]:
            raise ConfigError(f"freeze: names must be comma-separated parameter-name parts, got {self.names!r}")

    def apply(self, update: SharedUpdate, context: ClientContext, generator: torch.Generator) -> SharedUpdate:
        parts = [n.strip() for n in self.names.split(",") if n.strip()]
        if not any(part in name for name in update.tensors for part in parts):
            raise ConfigError(f"freeze: no parameter of the update matches {self.names!r}")
        return map_tensors(update, lambda name, t: torch.zeros_like(t) if any(p in name for p in parts) else t)
