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
from typing import Any, Mapping

from .data.spec import DataSpec
from .errors import ConfigError
from .limits import check_input_shape, short_repr
from .update import SharedUpdate

__all__ = ["ThreatModel"]


def _data_spec(value: Any) -> DataSpec:
    """A DataSpec from ``{mean: [...], std: [...]}`` (as a config file gives it)."""
    if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
        raise ConfigError(f"data_spec must be a DataSpec or a mapping {{mean: [...], std: [...]}}, got {short_repr(value)}")
    try:
        return DataSpec(value["mean"], value["std"])
    except ConfigError as error:
        raise ConfigError(f"data_spec: {error}") from None


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker knows beyond the model and the update tensors.

    labels_known: the client shares its labels (they travel in the update).
    batch_size_known: the update's metadata reveals the batch size.
    bn_statistics: the client's BatchNorm batch statistics (buffers) are visible.
    data_spec: the client's input normalization; ``None`` means "use the update's".
    input_shape: (C, H, W) of one input; ``None`` means "use the update's".
    server: ``honest`` (honest but curious: it sends the real model) or ``malicious`` (it may
        change the weights, or insert modules, in the model it sends; the client trains on
        what it receives). Malicious-server attacks refuse an honest threat model.
    """

    labels_known: bool = False
    batch_size_known: bool = True
    bn_statistics: bool = False
    data_spec: DataSpec | None = None
    input_shape: tuple[int, ...] | None = None
    server: str = "honest"

    def __post_init__(self):
        """Flags must be booleans; ``data_spec`` a DataSpec or a {mean, std} mapping; ``input_shape``
        1-4 positive integers within :mod:`gradleak.limits` (sides <= 4096, C*H*W <= 2**24)."""
        for name in ("labels_known", "batch_size_known", "bn_statistics"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {short_repr(getattr(self, name))}")
        if self.data_spec is not None and not isinstance(self.data_spec, DataSpec):
            object.__setattr__(self, "data_spec", _data_spec(self.data_spec))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", check_input_shape("input_shape", self.input_shape))
        if self.server not in ("honest", "malicious"):
            raise ConfigError(f"server must be 'honest' or 'malicious', got {short_repr(self.server)}")

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
            "server": self.server,
        }
