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
import zlib
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
from .attacks import best_psnr, is_auto, parse_attacks, run_attack, run_auto
from .contract import protocol_of

__all__ = ["leakage_gate", "LeakageGate", "PSNR", "PSNR_AFTER", "ACTION", "SECONDS", "PASSED", "DEFENDED", "UNMEASURED",
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
                 verify: bool = True, seed: int = 0) -> "LeakageGate":
    """A Flower client mod ``(msg, context, call_next) -> Message`` gating train replies.

    ``model``: the federation's model spec; ``data(context) -> (images, labels)``: the
    client's training data ([0, 1] NCHW, as it trained on them); ``attacks``: ``(name,
    options)`` pairs tried in order until one reaches the threshold, or ``"auto"`` (the
    analyser's plan, as the server-side audit runs it); ``time_budget``: seconds
    for all of them (each gradient-matching attack gets what is left; ``verify`` gets a
    budget of its own); ``threat``: the server's view (default: no labels); ``seed``: of the
    defense's randomness (fresh every round, the same in a rerun: see ``LeakageGate._noise_seed``)."""
    return LeakageGate(model, data, num_classes, parse_attacks(attacks), check_float("threshold_psnr", threshold_psnr),
                       _defense(action, defense), check_float("time_budget", time_budget, low_open=True), data_spec,
                       threat or ThreatModel(), bool(verify), seed)


class LeakageGate:
    """The mod :func:`leakage_gate` returns (picklable: Ray ships it to the ClientApp actors)."""

    def __init__(self, model, data, num_classes, attacks, threshold, defense, budget, data_spec, threat, verify, seed):
        self.model, self.data, self.num_classes, self.attacks = model, data, num_classes, attacks
        self.threshold, self.defense, self.budget, self.data_spec = threshold, defense, budget, data_spec
        self.threat, self.verify, self.seed = threat, verify, seed
        self.calls = 0
        self._built: dict[tuple, Any] = {}

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        start = time.perf_counter()
        try:
            return self._gate(msg, reply, context, start)
        except Exception as error:  # noqa: BLE001 - the gate failed: send as it is, say so in the metrics
            log.warning("gradleak gate: could not measure the update (%s: %s); sending it unchanged",
                        type(error).__name__, one_line(error, 300))
            _record(reply, -1.0, -1.0, UNMEASURED, time.perf_counter() - start)
            return reply

    def _update(self, msg: Message, reply: Message, images: torch.Tensor):
        """The client's update as the server will see it, the model at the round, the global tensors."""
        key = tuple(images.shape[1:])
        if key not in self._built:
            self._built[key] = self.model.build(key, self.num_classes)
        built = self._built[key]
        params, buffers = state_shapes(built)
        shapes = {**params, **buffers}
        global_tensors = record_tensors(reply_arrays(msg.content, "message"), shapes, "global arrays",
                                        floating=set(params))
        state = built.module.state_dict()
        with torch.no_grad():
            for name, value in global_tensors.items():
                state[name].copy_(value.to(state[name].dtype))
        local = record_tensors(reply_arrays(reply.content, "reply"), shapes, "reply arrays", floating=set(params))
        config: dict[str, Any] = {}
        for record in msg.content.config_records.values():
            config.update(dict(record.items()))
        values: dict[str, Any] = {}
        for record in reply.content.metric_records.values():
            values.update(dict(record.items()))
        spec = self.data_spec or built.data_spec or DataSpec()
        update = delta_update(global_tensors, local, built, protocol_of(values, config), data_spec=spec)
        return update, built, global_tensors

    def _gate(self, msg: Message, reply: Message, context: Context, start: float) -> Message:
        images, labels = self.data(context)
        update, built, global_tensors = self._update(msg, reply, images)
        psnr, name = self._measure(built, update, (images, labels), start)
        if psnr is None:
            log.warning("gradleak gate: nothing measured (%s); sending the update",
                        update.extra["flower"]["protocol"])
            _record(reply, -1.0, -1.0, UNMEASURED, time.perf_counter() - start)
            return reply
        if psnr < self.threshold:
            log.info("gradleak gate: %s reconstructs at %.1f dB < %.1f dB: sending the update", name, psnr,
                     self.threshold)
            _record(reply, psnr, -1.0, PASSED, time.perf_counter() - start)
            return reply
        if self.defense is None:
            reason = (f"{BLOCK_PREFIX}: {name} reconstructs the client's images at {psnr:.1f} dB PSNR >= "
                      f"the threshold {self.threshold:.1f} dB")
            log.warning("gradleak gate: %s", reason)
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
        after = self._defend(msg, reply, context, update, built, global_tensors, (images, labels))
        log.warning("gradleak gate: %s reconstructs at %.1f dB >= %.1f dB: applied %s (after: %.1f dB)", name, psnr,
                    self.threshold, self.defense.label(), after)
        _record(reply, psnr, after, DEFENDED, time.perf_counter() - start)
        return reply

    def _noise_seed(self, msg: Message, context: Context) -> int:
        """Fresh randomness every round, the same in every run of the same federation: seeded by
        the gate's seed, the client (its ``partition-id`` where the node config has one, as in
        Flower's simulation, whose node ids change from run to run; else its node id) and the
        server round (FedAvg's ``server-round`` in the train config; else this gate's call count)."""
        self.calls += 1
        client = context.node_config.get("partition-id", msg.metadata.dst_node_id)
        client = client if isinstance(client, int) and not isinstance(client, bool) else zlib.crc32(
            str(client).encode())
        step = next((r["server-round"] for r in msg.content.config_records.values() if "server-round" in r), None)
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.calls
        return ((self.seed * 1_000_003 + client % 1_000_003) * 7919 + step % 1_000_003) % 2**63

    def _defend(self, msg, reply, context, update, built, global_tensors, truth) -> float:
        """Apply the defense to the delta, put ``global + defended delta`` in the reply; the PSNR after (-1: none)."""
        generator = torch.Generator().manual_seed(self._noise_seed(msg, context))
        images, labels = truth
        context = ClientContext(built.module, images.to(built.device, built.dtype), labels.to(built.device),
                                update.data_spec, built.loss, self.seed)
        defended = self.defense.apply(update, context, generator)
        after = -1.0
        if self.verify:
            measured, _ = self._measure(built, defended, truth, time.perf_counter())   # a budget of its own
            after = -1.0 if measured is None else measured
        params = {n: global_tensors[n].to(built.dtype) + defended.tensors[n].to(built.dtype) for n in update.tensors}
        key = next(iter(reply.content.array_records.keys()))
        reply.content[key] = arrays_from_tensors(reply.content[key], params)
        return after

    def _measure(self, built, update, truth, start: float) -> tuple[float | None, str]:
        """The best PSNR of the attacks within the budget, stopping at the first over the threshold."""
        best, best_name = None, ""
        if is_auto(self.attacks):     # the analyser's plan, closed forms first, until one certifies exact
            outcomes = run_auto(self.attacks[0][1], built, update, self.threat, truth=truth,
                                time_budget=max(self.budget - (time.perf_counter() - start), 1e-3))
            scored = [o for o in outcomes if best_psnr([o]) is not None]
            top = max(scored, key=lambda o: best_psnr([o]), default=None)
            return (None, "") if top is None else (best_psnr([top]), top.attack)
        for name, options in self.attacks:
            left = self.budget - (time.perf_counter() - start)
            if left <= 0:
                break
            outcome = run_attack(name, options, built, update, self.threat, truth=truth, time_budget=left)
            value = best_psnr([outcome])
            if value is not None and (best is None or value > best):
                best, best_name = value, name
            if best is not None and best >= self.threshold:
                break
        return best, best_name


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
