"""What the audit reads from one Flower train reply besides its arrays: its metrics and
config entries (untrusted), the client gate's measurements, and whether it shares the
whole model; and what a gate's defense changes in the explanation."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from flwr.app import Message

from ..limits import short_repr
from .explain import APPROXIMATE, EXACT, NOT_ATTACKABLE, POSSIBLE, Explanation
from .gate import ACTION, DEFENDED, PSNR, PSNR_AFTER, SECONDS
from .records import AuditRecord

__all__ = ["content_values", "gate_metrics", "partly_shared", "gate_reasons", "client_name", "PARTITION_KEYS",
           "metrics_without_audit"]

# Flower's simulations number their clients by the node config's "partition-id"; a client that
# puts it in its reply's metrics is named "client <id>" in the audit's log and report.
PARTITION_KEYS = ("partition-id", "partition_id")


def content_values(message: Message) -> dict[str, Any]:
    """Every MetricRecord and ConfigRecord entry of a reply (untrusted; checked by protocol_of)."""
    values: dict[str, Any] = {}
    for record in (*message.content.config_records.values(), *message.content.metric_records.values()):
        values.update(dict(record.items()))
    return values


def client_name(values: Mapping[str, Any]) -> str | None:
    """``"client 2"`` from a reply's ``partition-id`` metric (an int in 0..10^6), else None."""
    for key in PARTITION_KEYS:
        value = values.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**6:
            return f"client {value}"
    return None


def metrics_without_audit(records: list, weighting_metric_name: str):
    """FedAvg's ``train_metrics_aggr_fn`` without the audit's own keys: the ``gradleak-*``
    protocol and gate metrics and the partition id are per-client facts, and their
    weighted average ("gate PSNR after: -0.66") means nothing. Pass it to your strategy:
    ``FedAvg(..., train_metrics_aggr_fn=metrics_without_audit)``; the arrays are untouched."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    def own(key: str) -> bool:
        return key.startswith("gradleak-") or key in PARTITION_KEYS

    kept = []
    for record in records:
        copy = RecordDict()
        for name, metrics in record.metric_records.items():
            copy[name] = MetricRecord({k: v for k, v in metrics.items() if not own(k)})
        kept.append(copy)
    return aggregate_metricrecords(kept, weighting_metric_name)


def gate_metrics(values: Mapping[str, Any], record: AuditRecord) -> dict[str, float | int]:
    """The client gate's four measurements in a reply (:mod:`gradleak.flower.gate`), each a
    finite number; anything else the client sent under those keys is refused in a note."""
    kept: dict[str, float | int] = {}
    for key in (PSNR, PSNR_AFTER, ACTION, SECONDS):
        if key not in values:
            continue
        value = values[key]
        if (isinstance(value, float) and math.isfinite(value)
                or isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53):
            kept[key] = value
        else:
            record.notes.append(f"gate metric {key} refused: expected a finite number, got {short_repr(value, 80)}")
    return kept


def partly_shared(record: AuditRecord, params: Mapping[str, Any], local: Mapping[str, torch.Tensor],
                  global_tensors: Mapping[str, torch.Tensor]) -> bool:
    """A reply that shares only some of the model's parameters (e.g. personalised layers kept
    local): explained, not attacked, since the server lacks the rest of the client's model."""
    missing = [n for n in params if n not in local or n not in global_tensors]
    if not missing:
        return False
    shared = [n for n in params if n not in missing]
    record.explanation = Explanation(NOT_ATTACKABLE, [
        f"the reply shares {len(shared)} of the model's {len(params)} parameter tensors (not shared: "
        f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): the server does not know the client's "
        "whole model at the end of its training, so no attack can simulate its update"])
    return True


def gate_reasons(record: AuditRecord) -> None:
    """A client whose gate defended its update: say so, and no exact closed form is predicted
    for the perturbed update (the analyser's verdict is for the update before the defense)."""
    if record.gate.get(ACTION) != DEFENDED or record.explanation is None:
        return
    reasons = record.explanation.reasons
    reasons.insert(0, f"the client's gate defended this update before sending it (it measured "
                      f"{record.gate.get(PSNR, -1):.1f} dB before, {record.gate.get(PSNR_AFTER, -1):.1f} dB after): the "
                      "closed forms' verdict below is for the undefended update")
    if record.explanation.verdict in (EXACT, POSSIBLE):
        record.explanation.verdict = APPROXIMATE
