"""``ThreatModel``: what the attacker is granted.

The attacker (an honest-but-curious server) always has the model (architecture and the
weights at the round) and the :class:`~gradleak.update.SharedUpdate`. Everything else is
a switch here: the labels, the batch size, BatchNorm statistics, the data normalization
and the input shape. :meth:`ThreatModel.observe` strips what is not granted from an
update, so an attack can only use what the threat model allows; ground truth never
enters an attack and is used only in evaluation.

Every run and audit cell is also labelled in the vocabulary of the SoK on gradient
inversion in FL (Carletti et al., USENIX Security 2025), threat models A-H
(:data:`SOK_THREAT_MODELS`, :func:`sok_threat_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from .data.spec import DataSpec
from .errors import ConfigError
from .limits import check_bool, check_input_shape, short_repr
from .update import SharedUpdate

__all__ = ["ThreatModel", "SOK_THREAT_MODELS", "sok_threat_model"]


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
            check_bool(name, getattr(self, name))
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

    def sok(self, attack: Any = None) -> dict[str, str]:
        """This threat model's SoK label (A-H) for ``attack``: see :func:`sok_threat_model`."""
        return sok_threat_model(self, attack)

    def to_json(self) -> dict[str, Any]:
        return {
            "labels_known": self.labels_known,
            "batch_size_known": self.batch_size_known,
            "bn_statistics": self.bn_statistics,
            "data_spec": None if self.data_spec is None else self.data_spec.to_json(),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "server": self.server,
        }


# The SoK's threat models (Carletti et al., "SoK: Gradient Inversion Attacks in Federated
# Learning", USENIX Security 2025, Table of threat models): each adds to the one before it;
# F-H are active (the server manipulates the model or the clients).
SOK_THREAT_MODELS: dict[str, tuple[str, str]] = {
    "A": ("Eavesdropper", "sees the model updates only"),
    "B": ("Informed Eavesdropper", "A + basic knowledge: the architecture and the weights at the round"),
    "C": ("Parameter-Aware Eavesdropper", "B + the clients' training details (labels, local learning rate, "
          "steps, epochs)"),
    "D": ("Data-Enhanced Eavesdropper", "C + surrogate (public) data from the clients' distribution"),
    "E": ("Statistical-Informed Eavesdropper", "D + statistics of the clients' data (e.g. BatchNorm statistics)"),
    "F": ("Active Manipulator", "C + changes the model (weights, modules) it sends"),
    "G": ("Data-Enhanced Manipulator", "F + surrogate (public) data"),
    "H": ("Active Client Manipulator", "G + chooses which clients train (not modelled by gradleak)"),
}


def sok_threat_model(threat: "ThreatModel", attack: Any = None) -> dict[str, str]:
    """The SoK letter for ``threat`` as ``attack`` uses it: ``{"id", "name", "why"}``.

    Every gradleak attack knows the architecture and the weights (B at least; A is never
    enough). Honest server: E when BatchNorm statistics are granted, D when the attack uses
    public data (``attack.surrogate_data``), C when it is granted the labels or uses the
    local training schedule (``attack.training_details``), else B. Malicious server: G with
    public data, else F. The batch size counts as basic knowledge (the SoK files Inverting
    Gradients, which assumes it, under B)."""
    surrogate = bool(getattr(attack, "surrogate_data", False))
    details = bool(getattr(attack, "training_details", False))
    if threat.server == "malicious":
        letter, why = ("G", "a malicious server with public data") if surrogate else \
            ("F", "a malicious server changing the model it sends")
    elif threat.bn_statistics:
        letter, why = "E", "the clients' BatchNorm statistics are granted"
    elif surrogate:
        letter, why = "D", "the attack uses public data"
    elif threat.labels_known or details:
        letter, why = "C", ("the labels are granted" if threat.labels_known else
                            "the attack uses the clients' local training schedule")
    else:
        letter, why = "B", "architecture and weights known; nothing else granted"
    return {"id": letter, "name": SOK_THREAT_MODELS[letter][0], "why": why}
