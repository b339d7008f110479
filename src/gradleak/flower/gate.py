"""A client-side leakage gate: a Flower client mod that attacks the client's own update
before it is sent, and above a threshold blocks it or applies a defense.

The gate runs after the ClientApp has trained (``call_next``). It forms the update the
server will see (the delta between the reply's weights and the weights the message
brought, with the protocol from the reply's metrics and the train config,
:mod:`gradleak.flower.contract`), attacks it with the chosen gradleak attacks within a
time budget, and scores the reconstructions against the client's own data (which the
client has; the server never does). Then:

- below ``threshold_psnr`` (or when nothing could be measured): the reply goes out as it is;
- above it, ``action="block"``: the reply is replaced by an error reply
  (``ErrorCode.MOD_FAILED_PRECONDITION``), which Flower's ``FedAvg`` counts as a failure
  and leaves out of the aggregate (checked in Flower 1.42); the reason says what was measured;
- above it, ``action="defense"``: a gradleak update-stage defense (e.g.
  ``"gaussian:variance=1e-4"``) is applied to the delta, the reply's weights become
  ``global + defended delta``, and with ``verify`` the defended update is attacked again.

Every sent reply carries the gate's measurements in its metrics (the same keys always, as
FedAvg requires): ``gradleak-gate-psnr`` (best mean PSNR, -1 if not measured),
``gradleak-gate-psnr-after`` (after the defense, -1 if none), ``gradleak-gate-action``
(:data:`PASSED` 0, :data:`DEFENDED` 1, :data:`UNMEASURED` -1) and ``gradleak-gate-seconds``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from flwr.app import Context, Error, Message, MessageType, MetricRecord
from flwr.common.constant import ErrorCode

from ..data.spec import DataSpec
from ..defenses import ClientContext, make_defense
from ..errors import ConfigError, one_line
from ..limits import check_float
from ..models.spec import ModelSpec
from ..threat import ThreatModel
from .arrays import arrays_from_tensors, delta_update, record_tensors, reply_arrays, state_shapes
from .attacks import best_psnr, parse_attacks, run_attack
from .contract import protocol_of

__all__ = ["leakage_gate", "PSNR", "PSNR_AFTER", "ACTION", "SECONDS", "PASSED", "DEFENDED", "UNMEASURED",
           "BLOCK_PREFIX"]

log = logging.getLogger("flwr")          # Flower's logger: printed by ClientApps in the simulation too
PSNR, PSNR_AFTER, ACTION, SECONDS = ("gradleak-gate-psnr", "gradleak-gate-psnr-after", "gradleak-gate-action",
                                     "gradleak-gate-seconds")
PASSED, DEFENDED, UNMEASURED = 0, 1, -1
BLOCK_PREFIX = "gradleak gate blocked the update"
Data = Callable[[Context], "tuple[torch.Tensor, torch.Tensor]"]


def _defense(action: str, defense: Any):
    if action not in ("block", "defense"):
        raise ConfigError(f"leakage_gate: action must be 'block' or 'defense', got {action!r}")
    if action == "block":
        return None
    made = make_defense(defense) if defense is not None else None
    if made is None or made.stage != "update":
        raise ConfigError(f"leakage_gate: action='defense' needs an update-stage defense spec such as "
                          f"'gaussian:variance=1e-4', got {defense!r}")
    return made


def leakage_gate(model: ModelSpec, data: Data, *, num_classes: int, attacks: Any = (("inverting-gradients", {}),),
                 threshold_psnr: float = 18.0, action: str = "block", defense: Any = None,
                 time_budget: float = 60.0, data_spec: DataSpec | None = None, threat: ThreatModel | None = None,
                 verify: bool = True, seed: int = 0) -> Callable[[Message, Context, Callable], Message]:
    """A Flower client mod ``(msg, context, call_next) -> Message`` gating train replies.

    ``model``: the federation's model spec; ``data(context) -> (images, labels)``: the
    client's training data ([0, 1] NCHW, as it trained on them); ``attacks``: ``(name,
    options)`` pairs tried in order until one reaches the threshold; ``time_budget``: seconds
    for all of them (each gradient-matching attack gets what is left); ``threat``: the
    server's view (default: no labels)."""
    attack_list = parse_attacks(attacks)
    threshold = check_float("threshold_psnr", threshold_psnr)
    budget = check_float("time_budget", time_budget, low_open=True)
    chosen_defense = _defense(action, defense)
    threat = threat or ThreatModel()
    built_cache: dict[tuple, Any] = {}
    calls = [0]

    def gate(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        start = time.perf_counter()
        try:
            return _gate_reply(msg, reply, context, start)
        except Exception as error:  # noqa: BLE001 - the gate failed: send as it is, say so in the metrics
            log.warning("gradleak gate: could not measure the update (%s: %s); sending it unchanged",
                        type(error).__name__, one_line(error, 300))
            _record(reply, -1.0, -1.0, UNMEASURED, time.perf_counter() - start)
            return reply

    def _gate_reply(msg: Message, reply: Message, context: Context, start: float) -> Message:
        images, labels = data(context)
        key = tuple(images.shape[1:])
        if key not in built_cache:
            built_cache[key] = model.build(key, num_classes)
        built = built_cache[key]
        params, buffers = state_shapes(built)
        shapes = {**params, **buffers}
        global_tensors = record_tensors(reply_arrays(msg.content, "message"), shapes, "global arrays",
                                        floating=set(params))
        state = built.module.state_dict()
        with torch.no_grad():
            for name, value in global_tensors.items():
                state[name].copy_(value.to(state[name].dtype))
        local_record = reply_arrays(reply.content, "reply")
        local = record_tensors(local_record, shapes, "reply arrays", floating=set(params))
        config: dict[str, Any] = {}
        for record in msg.content.config_records.values():
            config.update(dict(record.items()))
        values: dict[str, Any] = {}
        for record in reply.content.metric_records.values():
            values.update(dict(record.items()))
        protocol = protocol_of(values, config)
        spec = data_spec or built.data_spec or DataSpec()
        update = delta_update(global_tensors, local, built, protocol, data_spec=spec)
        truth = (images, labels)
        psnr, name = _measure(built, update, truth, start)
        if psnr is None:
            log.warning("gradleak gate: nothing measured (protocol %s); sending the update", protocol.to_json())
            _record(reply, -1.0, -1.0, UNMEASURED, time.perf_counter() - start)
            return reply
        if psnr < threshold:
            log.info("gradleak gate: %s reconstructs at %.1f dB < %.1f dB: sending the update", name, psnr, threshold)
            _record(reply, psnr, -1.0, PASSED, time.perf_counter() - start)
            return reply
        if chosen_defense is None:
            reason = (f"{BLOCK_PREFIX}: {name} reconstructs the client's images at {psnr:.1f} dB PSNR >= "
                      f"the threshold {threshold:.1f} dB")
            log.warning("gradleak gate: %s", reason)
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
        calls[0] += 1   # fresh noise every round: seeded by the gate's seed, the node and the call count
        generator = torch.Generator().manual_seed((seed * 1_000_003 + int(msg.metadata.dst_node_id) % 1_000_003)
                                                  * 7919 + calls[0])
        context_ = ClientContext(built.module, images.to(built.device, built.dtype), labels.to(built.device),
                                 spec, built.loss, seed)
        defended = chosen_defense.apply(update, context_, generator)
        after = -1.0
        if verify:
            measured, _ = _measure(built, defended, truth, time.perf_counter())   # its own budget
            after = -1.0 if measured is None else measured
        new_params = {n: global_tensors[n].to(built.dtype) + defended.tensors[n].to(built.dtype) for n in params}
        key_name = next(iter(reply.content.array_records.keys()))
        reply.content[key_name] = arrays_from_tensors(local_record, new_params)
        log.warning("gradleak gate: %s reconstructs at %.1f dB >= %.1f dB: applied %s (after: %.1f dB)", name, psnr,
                    threshold, chosen_defense.label(), after)
        _record(reply, psnr, after, DEFENDED, time.perf_counter() - start)
        return reply

    def _measure(built, update, truth, start: float) -> tuple[float | None, str]:
        """The best PSNR of the attacks within the budget, stopping at the first over the threshold."""
        best, best_name = None, ""
        for name, options in attack_list:
            left = budget - (time.perf_counter() - start)
            if left <= 0:
                break
            outcome = run_attack(name, options, built, update, threat, truth=truth, time_budget=left)
            value = best_psnr([outcome])
            if value is not None and (best is None or value > best):
                best, best_name = value, name
            if best is not None and best >= threshold:
                break
        return best, best_name

    return gate


def _record(reply: Message, psnr: float, after: float, action: int, seconds: float) -> None:
    """The gate's measurements in the reply's MetricRecord (a new one if it has none)."""
    records = reply.content.metric_records
    if records:
        metrics = next(iter(records.values()))
    else:
        metrics = MetricRecord()
        reply.content["gradleak-gate"] = metrics
    metrics[PSNR], metrics[PSNR_AFTER] = _finite(psnr), _finite(after)
    metrics[ACTION], metrics[SECONDS] = int(action), float(seconds)


def _finite(value: float) -> float:
    """A PSNR a MetricRecord can carry and average: identical images (inf) become 999 dB."""
    return 999.0 if value == float("inf") else -1.0 if value != value or value == float("-inf") else float(value)
