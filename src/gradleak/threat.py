"""``ThreatModel``: what the attacker is granted.

The attacker (an honest-but-curious server) always has the model (architecture and the
weights at the round) and the :class:`~gradleak.update.SharedUpdate`. Everything else is
a switch here: the labels, the batch size, BatchNorm statistics, the data normalization
and the input shape. :meth:`ThreatModel.observe` strips what is not granted from an
update, so an attack can only use what the threat model allows; ground truth never
enters an attack and is used only in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .data.spec import DataSpec
from .errors import ConfigError
from .update import SharedUpdate

__all__ = ["ThreatModel"]


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker knows beyond the model and the update tensors.

    labels_known: the client shares its labels (they travel in the update).
    batch_size_known: the update's metadata reveals the batch size.
    bn_statistics: the client's BatchNorm batch statistics (buffers) are visible.
    data_spec: the client's input normalization; ``None`` means "use the update's".
    input_shape: (C, H, W) of one input; ``None`` means "use the update's".
    """

    labels_known: bool = False
    batch_size_known: bool = True
    bn_statistics: bool = False
    data_spec: DataSpec | None = None
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigError(f"ThreatModel.input_shape must be positive integers, e.g. (3, 32, 32); got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)

    def observe(self, update: SharedUpdate) -> SharedUpdate:
        """The update as this attacker sees it: labels, batch size and buffers removed
        unless granted; input shape and normalization filled in from the threat model."""
        if self.labels_known and update.labels is None:
            raise ConfigError("the threat model grants labels, but the update carries none (was it captured with share_labels?)")
        return replace(
            update,
            labels=update.labels if self.labels_known else None,
            batch_size=update.batch_size if self.batch_size_known else None,
            buffers=update.buffers if self.bn_statistics else None,
            input_shape=self.input_shape or update.input_shape,
            data_spec=self.data_spec or update.data_spec,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "labels_known": self.labels_known,
            "batch_size_known": self.batch_size_known,
            "bn_statistics": self.bn_statistics,
            "data_spec": None if self.data_spec is None else self.data_spec.to_json(),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
        }
