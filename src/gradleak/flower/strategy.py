"""``LeakageAuditStrategy``: audit what a Flower server could reconstruct, round by round and
client by client, without changing the training.

It wraps any strategy of Flower's Message API (``FedAvg`` and the strategies built like it),
the way Flower's own DP wrappers do (``flwr/serverapp/strategy/dp_fixed_clipping.py``):
``configure_train`` keeps the round's global arrays and the config each client was sent,
then delegates; ``aggregate_train`` turns every selected reply into a
:class:`~gradleak.update.SharedUpdate` (the delta ``local - global``, the client being
``msg.metadata.src_node_id``, its protocol from the reply's metrics and the train config:
:mod:`gradleak.flower.contract`), explains it (:func:`~gradleak.flower.explain.explain`),
captures it to disk for ``gradleak attack`` and/or attacks it in-line with gradleak's
pipeline (by default ``attacks="auto"``: the attacks the analyser finds applicable, exact
closed forms first, stopping at the first reconstruction its update residual certifies
exact), and then hands the *same, untouched* replies to the wrapped strategy. The
aggregate is therefore bit-identical with and without the wrapper, and an error in the
audit is recorded, never raised into the training. Every reconstruction is kept (in the
record, beside the captured update, in the report) with its update residual, the
truth-free measure (:mod:`gradleak.residual`): the audit shows what was recovered without
the clients' data.

With ``secure_aggregation=True`` each audited round also attacks what the server would
still learn under secure aggregation: the FedAvg-weighted mean of the round's client
deltas. Flower's SecAgg+ exists only in its legacy workflow API, which a Message-API
strategy cannot wrap, so the sum is simulated in the clear, as gradleak's
``secure-aggregation`` defense does (the server learns exactly the sum).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..data.spec import DataSpec
from ..errors import ConfigError, one_line
from ..limits import check_float, check_int, check_seed
from ..models.spec import ModelSpec
from ..threat import ThreatModel
from ._reply import client_name, content_values, gate_metrics, gate_reasons, partly_shared
from .arrays import delta_update, record_tensors, reply_arrays, state_shapes
from .attacks import is_auto, parse_attacks, run_attack, run_auto
from .capture import save_reconstruction, update_path
from .contract import check_declared, protocol_of
from .explain import EXACT, NOT_ATTACKABLE, POSSIBLE, Explanation, explain
from .records import AuditRecord, aggregate_record, skipped

__all__ = ["LeakageAuditStrategy", "AuditRecord"]

log = logging.getLogger("gradleak.flower")
Truth = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor] | None"]
Declared = Mapping[str, Any] | Mapping[int, Mapping[str, Any]] | Callable[[int], "Mapping[str, Any] | None"]


class LeakageAuditStrategy(Strategy):
    """Wrap ``strategy`` and audit each selected client's train reply.

    ``model``: the federation's model (a :class:`~gradleak.models.ModelSpec`, built for
    ``input_shape`` and ``num_classes``). ``attacks``: ``"auto"`` (the default: the attacks
    the analyser finds applicable for the protocol each client ran, exact closed forms
    first, stopping at the first certified exact; ``("auto", options)`` passes options,
    ``NAME.key`` to one attack), or ``(name, options)`` pairs run in-line (empty: capture
    and explain only). ``protocol``: what the server knows of the clients' training, read
    under gradleak's and Flower's names (``training_config(...)``, or the app's
    ``context.run_config`` with ``local-epochs``, ``batch-size``, ``learning-rate``): one
    mapping for every client, ``{node_id: mapping}``, or ``node_id -> mapping``; a reply's
    metrics and the train config take precedence. ``rounds``: the rounds to audit (None: all).
    ``clients``: None (all), a fraction in (0, 1] or a count of each round's replies,
    sampled with ``seed``. ``capture_dir``: save each audited update as
    ``round-XXX/node-<id>.safetensors`` (and its truth as ``.truth.safetensors``).
    ``truth(node_id, server_round) -> (images, labels) | None``: ground truth, for scoring
    only. ``threat``: what the server is granted (default: not the labels). ``data_spec``:
    the clients' input normalization. ``max_examples``: larger clients are explained but
    not attacked. ``time_budget``: seconds per gradient-matching attack. ``keep_updates``:
    keep each record's :class:`SharedUpdate` in memory after its round (two copies of the
    model per record; off by default: ``capture_dir`` keeps them on disk)."""

    def __init__(self, strategy: Strategy, model: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int,
                 attacks: Any = "auto", protocol: Declared | None = None, rounds: Iterable[int] | None = None,
                 clients: float | int | None = None, capture_dir: str | Path | None = None, truth: Truth | None = None,
                 threat: ThreatModel | None = None, data_spec: DataSpec | None = None,
                 secure_aggregation: bool = False, max_examples: int = 256, time_budget: float | None = None,
                 numeric: bool = True, keep_updates: bool = False, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"LeakageAuditStrategy wraps a Flower Message-API Strategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.built = (model if isinstance(model, ModelSpec) else ModelSpec(model)).build(tuple(input_shape), num_classes)
        self.attacks = parse_attacks(attacks)
        self.protocol = self._check_protocol(protocol)
        self.rounds = None if rounds is None else {check_int("rounds", r, 1, 2**31) for r in rounds}
        self.clients = self._check_clients(clients)
        self.capture_dir = None if capture_dir is None else Path(capture_dir)
        self.truth, self.threat = truth, threat or ThreatModel()
        self.data_spec = data_spec or self.built.data_spec or DataSpec()
        self.secure_aggregation, self.numeric = bool(secure_aggregation), bool(numeric)
        self.keep_updates = bool(keep_updates)
        self.max_examples = check_int("max_examples", max_examples, 1, 4096)
        self.time_budget = check_float("time_budget", time_budget, low_open=True, optional=True)
        self.seed = check_seed("seed", seed)
        self.records: list[AuditRecord] = []
        self._sent: dict[int, tuple[ArrayRecord, dict[int, tuple[ArrayRecord, dict[str, Any]]]]] = {}

    @staticmethod
    def _check_protocol(protocol: Any) -> Any:
        if protocol is None or callable(protocol):
            return protocol
        if isinstance(protocol, Mapping) and protocol and all(isinstance(k, int) and not isinstance(k, bool)
                                                               for k in protocol):
            return {k: check_declared(v, f"protocol[{k}]") for k, v in protocol.items()}
        return check_declared(protocol)

    def _declared(self, node: int) -> Mapping[str, Any] | None:
        """What the server declared it knows of node ``node``'s training (None: nothing)."""
        if self.protocol is None:
            return None
        if callable(self.protocol):
            return self.protocol(node)
        if self.protocol and all(isinstance(k, int) for k in self.protocol):
            return self.protocol.get(node)
        return self.protocol

    @staticmethod
    def _check_clients(clients: Any) -> float | int | None:
        if clients is None or isinstance(clients, int) and not isinstance(clients, bool):
            return None if clients is None else check_int("clients", clients, 1, 2**31)
        return check_float("clients (a fraction)", clients, low_open=True, high=1.0)

    def __getattr__(self, name: str) -> Any:   # the wrapped strategy's own attributes (e.g. weighted_by_key)
        strategy = self.__dict__.get("strategy")
        if strategy is None:
            raise AttributeError(name)
        return getattr(strategy, name)

    def __repr__(self) -> str:
        return f"LeakageAuditStrategy({self.strategy!r})"

    def summary(self) -> None:
        log.info("gradleak audit: model %s, attacks %s, rounds %s, clients %s, capture %s", self.built.spec.label,
                 [a for a, _ in self.attacks] or "none", "all" if self.rounds is None else sorted(self.rounds),
                 "all" if self.clients is None else self.clients, self.capture_dir or "off")
        self.strategy.summary()

    # ------------------------------------------------------------------ the Strategy methods
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Delegate; keep the round's global arrays and what each client was sent."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent: dict[int, tuple[ArrayRecord, dict[str, Any]]] = {}
        for message in messages:
            try:
                content = message.content
                records = list(content.array_records.values())
                settings: dict[str, Any] = {}
                for record in content.config_records.values():
                    settings.update(dict(record.items()))
                sent[message.metadata.dst_node_id] = (records[0] if len(records) == 1 else arrays, settings)
            except Exception as error:  # noqa: BLE001 - never break the training for the audit
                log.warning("gradleak audit: round %d: cannot read a train message: %s", server_round, one_line(error))
        self._sent[server_round] = (arrays, sent)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Audit the selected replies, then delegate with the same replies, untouched."""
        replies = list(replies)
        try:
            if self.rounds is None or server_round in self.rounds:
                self._audit_round(server_round, replies)
        except Exception as error:  # noqa: BLE001 - an audit error is recorded, the training goes on
            log.warning("gradleak audit: round %d failed: %s", server_round, one_line(error))
            self.records.append(AuditRecord(server_round, None, status="error",
                                            message=f"{type(error).__name__}: {one_line(error, 300)}"))
        finally:
            self._sent.pop(server_round, None)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ the audit
    def _sample(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies to audit: all, or a seeded sample (a fraction or a count) kept in reply order."""
        if self.clients is None or not replies:
            return replies
        k = (min(self.clients, len(replies)) if isinstance(self.clients, int)
             else max(1, round(self.clients * len(replies))))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        chosen = set(rng.sample(sorted(m.metadata.src_node_id for m in replies), k))
        return [m for m in replies if m.metadata.src_node_id in chosen]

    def _load_round(self, server_round: int) -> dict[str, torch.Tensor]:
        """The round's global arrays as tensors, also copied into the attack model (its buffers at the round)."""
        arrays = self._sent.get(server_round, (None, {}))[0]
        if arrays is None:
            raise ConfigError(f"round {server_round}: configure_train was not called through the wrapper")
        params, buffers = state_shapes(self.built)
        tensors = record_tensors(arrays, {**params, **buffers}, "global arrays", floating=set(params))
        state = self.built.module.state_dict()
        with torch.no_grad():
            for name, value in tensors.items():
                if name in state:
                    state[name].copy_(value.to(state[name].dtype))
        return tensors

    def _audit_round(self, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self.records.append(AuditRecord(server_round, reply.metadata.src_node_id, status="no update",
                                                message=f"error reply, skipped by the strategy: "
                                                        f"{one_line(reply.error.reason, 300)}"))
        valid = [r for r in replies if not r.has_error()]
        chosen = {id(m) for m in self._sample(server_round, valid)}
        if not chosen and not self.secure_aggregation:
            return
        global_tensors = self._load_round(server_round)
        cache: dict[Any, Any] = {}
        audited = []
        for reply in valid:
            if id(reply) in chosen or self.secure_aggregation:
                record = self._audit_reply(server_round, reply, global_tensors, cache, attack=id(reply) in chosen)
                audited.append(record)
                if id(reply) in chosen:
                    self.records.append(record)
        if self.secure_aggregation and audited:
            self.records.append(self._audit_sum(server_round, audited, cache))
        if not self.keep_updates:
            for record in self.records:
                record.update = None

    def _audit_reply(self, server_round: int, reply: Message, global_tensors: Mapping[str, torch.Tensor],
                     cache: dict, *, attack: bool) -> AuditRecord:
        """One reply as an AuditRecord: protocol, update, explanation, capture, attacks."""
        start = time.perf_counter()
        node = reply.metadata.src_node_id
        record = AuditRecord(server_round, node)
        try:
            values = content_values(reply)
            record.client = client_name(values)
            record.gate = gate_metrics(values, record)
            sent_config = self._sent[server_round][1].get(node, (None, {}))[1]
            protocol = protocol_of(values, sent_config, self._declared(node))
            record.protocol = protocol.to_json()
            params, buffers = state_shapes(self.built)
            local = record_tensors(reply_arrays(reply.content, "reply"), {**params, **buffers}, "reply arrays",
                                   floating=set(params))
            if partly_shared(record, params, local, global_tensors):
                return record
            record.update = delta_update(global_tensors, local, self.built, protocol, data_spec=self.data_spec,
                                         extra={"node_id": node, "server_round": server_round})
            record.explanation = explain(record.update, self.built, protocol=protocol,
                                         labels_known=self.threat.labels_known, numeric=self.numeric, cache=cache)
            gate_reasons(record)
            record.truth = self._truth(node, server_round, record)
            if attack:
                self._capture(record)
                record.attacks = self._attacks(record, protocol.local_steps is None)
        except Exception as error:  # noqa: BLE001 - one bad reply never stops the audit of the others
            record.status, record.message = "error", f"{type(error).__name__}: {one_line(error, 300)}"
        record.seconds = time.perf_counter() - start
        log.info("gradleak audit: %s", record.line())
        return record

    def _truth(self, node: int | None, server_round: int, record: AuditRecord):
        if self.truth is None or node is None:
            return None
        try:
            truth = self.truth(node, server_round)
        except Exception as error:  # noqa: BLE001 - evaluation only: note it, audit on
            record.notes.append(f"truth unavailable: {type(error).__name__}: {one_line(error, 200)}")
            return None
        if truth is None:
            return None
        images, labels = truth     # images, or a text client's token ids (labels None for a language model)
        return images.detach().cpu(), None if labels is None else labels.detach().cpu()

    def _capture(self, record: AuditRecord) -> None:
        if self.capture_dir is None or record.update is None:
            return
        from ..runs import save_truth
        from ..update_file import save_update

        path = update_path(self.capture_dir, record.server_round, record.node_id)
        save_update(record.update, path)
        record.capture = str(path)
        if record.truth is not None and not record.truth[0].is_floating_point():   # a text client's token ids
            from ..text.pipeline import save_text_truth

            save_text_truth(path.with_suffix(".truth.safetensors"), record.truth[0])
        elif record.truth is not None:
            save_truth(path.with_suffix(".truth.safetensors"), *record.truth)

    def _keep(self, record: AuditRecord) -> None:
        """Each reconstruction saved beside the captured update (when capturing)."""
        if record.capture is None:
            return
        for outcome in record.attacks:
            saved = save_reconstruction(Path(record.capture), outcome)
            outcome.saved = None if saved is None else str(saved)

    def _attacks(self, record: AuditRecord, steps_unknown: bool) -> list:
        update = record.update
        n = update.batch_size
        why = ("the number of local steps is unknown: the delta cannot be modelled" if steps_unknown else
               "the number of examples is unknown" if n is None else
               f"{n} examples > max_examples={self.max_examples} (set by the auditor to bound the time)"
               if n > self.max_examples else None)
        if why is not None:
            return [skipped(name, why) for name, _ in self.attacks]
        if is_auto(self.attacks):   # closed forms only where the explanation predicts them (not for a sum of steps)
            why = record.explanation
            closed = why is not None and why.verdict in (EXACT, POSSIBLE) and why.analysis is not None
            outcomes = run_auto(self.attacks[0][1], self.built, update, self.threat, truth=record.truth,
                                verdicts=why.analysis["attacks"] if closed else [], time_budget=self.time_budget)
        else:
            outcomes = [run_attack(name, options, self.built, update, self.threat, truth=record.truth,
                                   time_budget=self.time_budget) for name, options in self.attacks]
        record.attacks = outcomes
        self._keep(record)
        return outcomes

    def _audit_sum(self, server_round: int, audited: list[AuditRecord], cache: dict) -> AuditRecord:
        """What the server still recovers under (simulated) secure aggregation of the round."""
        start = time.perf_counter()
        record = aggregate_record(server_round, audited, self.built)
        if record.update is None and record.status != "error":   # a client's protocol is unknown: so is the sum's
            record.explanation = Explanation(NOT_ATTACKABLE, list(record.notes))
            record.attacks = [skipped(name, record.notes[-1]) for name, _ in self.attacks]
        elif record.update is not None and record.status != "error":
            try:
                exact = record.update.extra["flower"]["exact"]
                record.explanation = explain(record.update, self.built, protocol=record.sum_protocol,
                                             labels_known=self.threat.labels_known, numeric=self.numeric, cache=cache,
                                             approximation=None if exact else record.notes[-1])
                record.explanation.reasons[:0] = record.notes if exact else record.notes[:-1]
                self._capture(record)
                record.attacks = self._attacks(record, False)
            except Exception as error:  # noqa: BLE001
                record.status, record.message = "error", f"{type(error).__name__}: {one_line(error, 300)}"
        record.seconds = time.perf_counter() - start
        log.info("gradleak audit: %s", record.line())
        return record

    # ------------------------------------------------------------------ results
    def to_json(self) -> dict[str, Any]:
        """The audit so far: settings and every record (JSON-safe once passed through ``to_jsonable``)."""
        declared = self.protocol if isinstance(self.protocol, Mapping) else (
            None if self.protocol is None else "per node (a function)")
        return {"model": self.built.description(), "model_spec": self.built.spec.to_json(),
                "attacks": [{"name": n, "options": o} for n, o in self.attacks],
                "protocol": {str(k): v for k, v in declared.items()} if isinstance(declared, Mapping) else declared,
                "rounds": None if self.rounds is None else sorted(self.rounds), "clients": self.clients,
                "threat": self.threat.to_json(), "data_spec": self.data_spec.to_json(),
                "secure_aggregation": self.secure_aggregation, "max_examples": self.max_examples,
                "time_budget": self.time_budget, "seed": self.seed,
                "records": [r.to_json() for r in self.records]}
