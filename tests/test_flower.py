"""gradleak.flower: the audit wrapper, the contract, the explanations, the gate, the report.

Most tests build Flower Messages by hand and call the strategy directly (no simulation):
the clients train with gradleak's functional FedAvg client on real built-in digits and
reply with their full local weights, as a Flower ClientApp does. One slow test runs the
example app in Flower's simulation engine (Ray) in a subprocess, bounded in time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

import gradleak as gl  # noqa: E402
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flower_support import Grid, flower_identity  # noqa: E402,F401 (a module-wide fixture)
from gradleak.data import load_builtin  # noqa: E402
from gradleak.flower import (LeakageAuditStrategy, leakage_gate, protocol_of, training_config,  # noqa: E402
                             training_metrics, write_report)
from gradleak.flower.explain import APPROXIMATE, EXACT, NOT_ATTACKABLE  # noqa: E402
from gradleak.flower.gate import ACTION, BLOCK_PREFIX, DEFENDED, PASSED, PSNR  # noqa: E402
from gradleak.models import ModelSpec  # noqa: E402
from gradleak.pipeline import attack_updates, make_attack  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE, CLASSES, SPEC = (1, 16, 16), 10, ModelSpec("lenet", device="cpu")
# node id -> (first image, examples, minibatch): one image in one step, 4 in one step, 8 in two steps
PLAN = {101: (0, 1, 1), 202: (1, 4, 4), 303: (5, 8, 4)}
ATTACKS = [("rgap", {}), ("inverting-gradients", {"iterations": 8})]


@pytest.fixture(scope="module")
def digits16():
    return load_builtin("digits", size=16, n=64)


@pytest.fixture(scope="module")
def data_spec(digits16):
    return gl.DataSpec.from_images(digits16.images)


def client_batch(digits16, node):
    start, n, _ = PLAN[node]
    return digits16.images[start:start + n], digits16.labels[start:start + n]


def local_state(global_record, node, digits16, data_spec, lr=0.1):
    """What a client's ClientApp replies with: its full state_dict after one local epoch."""
    _, n, batch = PLAN[node]
    model = SPEC.build(SHAPE, CLASSES).module
    model.load_state_dict(global_record.to_torch_state_dict())
    images, labels = client_batch(digits16, node)
    update = gl.fedavg_update(model, images, labels, lr=lr, epochs=1, local_batch_size=batch, spec=data_spec,
                              seed=node)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, delta in update.tensors.items():
        state[name] = state[name] + delta
    return state


def replies_for(messages, digits16, data_spec, metrics_of=None, extra=None):
    """Hand-built train replies to ``messages`` (deterministic: two calls give equal bytes)."""
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        state = local_state(message.content["arrays"], node, digits16, data_spec)
        _, n, batch = PLAN[node]
        metrics = metrics_of(node) if metrics_of else training_metrics(n, 0.1, batch, epochs=1)
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
        for key, record in (extra or {}).get(node, {}).items():
            content[key] = record
        out.append(Message(content, reply_to=message))
    return out


def instructions(global_record, config=None):
    return [Message(RecordDict({"arrays": global_record, "config": ConfigRecord(dict(config or {}))}), node,
                    MessageType.TRAIN) for node in PLAN]


def array_bytes(record):
    return {k: (v.dtype, tuple(v.shape), bytes(v.data)) for k, v in record.items()}


def audit_strategy(digits16, data_spec, **kwargs):
    return LeakageAuditStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3), SPEC,
                                input_shape=SHAPE, num_classes=CLASSES, data_spec=data_spec,
                                truth=lambda node, r: client_batch(digits16, node), **kwargs)


@pytest.fixture(scope="module")
def federation(digits16, data_spec, tmp_path_factory):
    """Two rounds through the wrapper (in-line attacks, capture, secure aggregation) and,
    on byte-identical copies of the same replies, through a plain FedAvg."""
    capture = tmp_path_factory.mktemp("capture")
    audit = audit_strategy(digits16, data_spec, attacks=ATTACKS, capture_dir=capture, secure_aggregation=True,
                           keep_updates=True)
    plain = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    rounds = []
    for server_round in (1, 2):
        messages = list(audit.configure_train(server_round, global_record, ConfigRecord({}), Grid(PLAN)))
        wrapped_replies = replies_for(messages, digits16, data_spec)
        plain_replies = replies_for(messages, digits16, data_spec)
        sent = {m.metadata.src_node_id: array_bytes(m.content["arrays"]) for m in wrapped_replies}
        wrapped, wrapped_metrics = audit.aggregate_train(server_round, wrapped_replies)
        reference, reference_metrics = plain.aggregate_train(server_round, plain_replies)
        rounds.append(dict(global_record=global_record, wrapped=wrapped, reference=reference, sent=sent,
                           replies=wrapped_replies, metrics=(wrapped_metrics, reference_metrics)))
        global_record = wrapped
    return audit, rounds, capture


def test_aggregate_bit_identical_with_and_without_the_wrapper(federation):
    _, rounds, _ = federation
    for r in rounds:
        assert array_bytes(r["wrapped"]) == array_bytes(r["reference"])
        assert dict(r["metrics"][0]) == dict(r["metrics"][1])
        for reply in r["replies"]:     # the audit read the replies, never changed them
            assert array_bytes(reply.content["arrays"]) == r["sent"][reply.metadata.src_node_id]


def test_delta_is_local_minus_global_per_parameter(federation):
    audit, rounds, _ = federation
    params = dict(audit.built.module.named_parameters())
    record = next(r for r in audit.records if r.server_round == 2 and r.node_id == 303)
    reply = next(m for m in rounds[1]["replies"] if m.metadata.src_node_id == 303)
    local = reply.content["arrays"].to_torch_state_dict()
    global_state = rounds[1]["global_record"].to_torch_state_dict()
    assert set(record.update.tensors) == set(params)
    for name in params:
        assert torch.equal(record.update.tensors[name], local[name] - global_state[name])
        assert torch.equal(record.update.weights[name], global_state[name])
    assert record.update.kind == "delta" and record.update.local_steps == 2 and record.update.local_lr == 0.1
    assert record.update.batch_size == 8 and record.update.local_batch_size == 4
    assert record.protocol["sources"]["local_steps"] == "computed"


def test_explanations_name_the_conditions(federation):
    audit, _, _ = federation
    by_node = {r.node_id: r for r in audit.records if r.server_round == 1}
    one = by_node[101]
    assert one.verdict == EXACT and any(reason.startswith("rgap:") for reason in one.explanation.reasons)
    rgap = next(o for o in one.attacks if o.attack == "rgap")
    assert rgap.status == "ok" and rgap.psnr_mean > 60           # exact, as predicted
    two_steps = by_node[303]
    assert two_steps.verdict == APPROXIMATE
    assert any("2 local steps" in reason and "no closed form" in reason for reason in two_steps.explanation.reasons)
    assert next(o for o in two_steps.attacks if o.attack == "rgap").status == "not applicable"
    summed = next(r for r in audit.records if r.server_round == 1 and r.kind == "secure-aggregation")
    assert sorted(summed.clients) == sorted(PLAN) and summed.update.batch_size == 13
    assert any("secure-aggregation defense" in reason for reason in summed.explanation.reasons)
    assert any("not the delta of any one protocol" in reason for reason in summed.explanation.reasons)


def test_secure_aggregation_sum_is_the_fedavg_mean_of_the_deltas(federation):
    audit, rounds, _ = federation
    summed = next(r for r in audit.records if r.server_round == 1 and r.kind == "secure-aggregation")
    before = rounds[0]["global_record"].to_torch_state_dict()
    after = rounds[0]["wrapped"].to_torch_state_dict()
    for name, tensor in summed.update.tensors.items():
        torch.testing.assert_close(tensor, after[name] - before[name], rtol=0, atol=1e-6)


def test_captured_update_attacked_offline_gives_the_audited_psnr(federation):
    """``gradleak attack`` on the captured file (here its Python API) gives the audit's PSNR."""
    from gradleak.metrics import score
    from gradleak.runs import load_truth

    audit, _, capture = federation
    for node in (101, 202):
        record = next(r for r in audit.records if r.server_round == 2 and r.node_id == node)
        path = Path(record.capture)
        assert path.parent == capture / "round-002"
        update = gl.load_update(path)
        images, labels = load_truth(path.with_suffix(".truth.safetensors"))
        built = SPEC.build(SHAPE, CLASSES)
        for name, options in ATTACKS:
            inline = next(o for o in record.attacks if o.attack == name)
            if inline.status != "ok":
                continue
            rec = attack_updates(make_attack(name, built.module, gl.ThreatModel(), dict(options)), [update],
                                 truths=[images], quiet=True)
            offline = score(rec.images, images, predicted_labels=rec.labels, true_labels=labels, use_lpips=False)
            assert [r["psnr"] for r in sorted(offline.per_image, key=lambda r: r["index"])] == inline.psnr


def test_protocol_from_metrics_config_or_unknown():
    metrics = training_metrics(12, 0.05, 4, epochs=2)
    assert set(metrics) == {"num-examples", "gradleak-lr", "gradleak-batch-size", "gradleak-epochs",
                            "gradleak-local-steps", "gradleak-train-mode"}
    p = protocol_of(metrics, {})
    assert (p.lr, p.local_steps, p.batch_size, p.num_examples, p.mode) == (0.05, 6, 4, 12, "train")
    assert p.sources == {"lr": "metrics", "batch_size": "metrics", "epochs": "metrics", "local_steps": "computed",
                         "num_examples": "metrics", "mode": "metrics"}
    p = protocol_of({"num-examples": 8}, training_config(0.1, batch_size=2, local_steps=3))
    assert (p.lr, p.local_steps, p.batch_size, p.sources["lr"], p.sources["local_steps"]) == (0.1, 3, 2, "config",
                                                                                               "config")
    p = protocol_of({"num-examples": 8}, {"lr": 0.2})     # Flower's examples call it "lr"
    assert p.lr == 0.2 and p.local_steps is None and p.sources["local_steps"] == "unknown" and not p.complete
    p = protocol_of(training_metrics(8, 0.05, 4, epochs=1), training_config(0.1, epochs=1))
    assert p.lr == 0.05 and "config asked for 0.1" in p.problems["lr"]


@pytest.mark.parametrize("bad", [-0.1, 0, float("nan"), float("inf"), "0.1", True, 10**400, [0.1], None])
def test_hostile_values_are_unknown_with_a_reason(bad):
    values = {"num-examples": bad, "gradleak-lr": bad, "gradleak-batch-size": bad, "gradleak-epochs": bad,
              "gradleak-local-steps": bad, "gradleak-train-mode": bad}
    p = protocol_of(values, {"gradleak-lr": bad})
    assert (p.lr, p.num_examples, p.batch_size, p.local_steps) == (None, None, None, None)
    assert p.mode == ("eval" if type(bad) is int and bad == 0 else None)     # 0 is a valid mode: eval
    if bad is not None and bad != 0:
        assert "lr" in p.problems and len(p.problems["lr"]) < 300 and "\n" not in p.problems["lr"]


def test_hostile_reply_recorded_and_aggregate_unchanged(digits16, data_spec):
    """A reply with a negative lr, a 10**30 batch size, a bad mode and NaN weights in another:
    each recorded with its reason; the aggregate is still FedAvg's, byte for byte."""
    def hostile(node):     # no epochs in anyone's metrics: node 202 sends a string in a ConfigRecord of its own
        _, n, batch = PLAN[node]
        honest = {"num-examples": n, "gradleak-lr": 0.1, "gradleak-batch-size": batch, "gradleak-train-mode": 1}
        return {**honest, "gradleak-lr": -0.1, "gradleak-batch-size": 10**30, "gradleak-train-mode": 7} \
            if node == 202 else honest

    audit = audit_strategy(digits16, data_spec, attacks=[("inverting-gradients", {"iterations": 2})])
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    messages = list(audit.configure_train(1, global_record, ConfigRecord({}), Grid(PLAN)))
    extra = {202: {"client-config": ConfigRecord({"gradleak-epochs": "many"})}}
    wrapped_replies = replies_for(messages, digits16, data_spec, hostile, extra)
    plain_replies = replies_for(messages, digits16, data_spec, hostile, extra)
    for replies in (wrapped_replies, plain_replies):   # node 303 sends a NaN: the audit refuses it, FedAvg does not
        nan = next(m for m in replies if m.metadata.src_node_id == 303).content["arrays"]
        state = nan.to_torch_state_dict()
        state["fc.bias"][0] = float("nan")
        next(m for m in replies if m.metadata.src_node_id == 303).content["arrays"] = ArrayRecord(dict(state))
    wrapped, _ = audit.aggregate_train(1, wrapped_replies)
    reference, _ = FedAvg(fraction_evaluate=0.0).aggregate_train(1, plain_replies)
    assert array_bytes(wrapped) == array_bytes(reference)
    by_node = {r.node_id: r for r in audit.records}
    bad = by_node[202]
    assert bad.protocol["lr"] is None and "got -0.1" in bad.protocol["problems"]["lr"]
    assert bad.protocol["batch_size"] is None and "digits" in bad.protocol["problems"]["batch_size"]
    assert bad.protocol["mode"] is None and bad.protocol["epochs"] is None and "'many'" in \
        bad.protocol["problems"]["epochs"]
    assert bad.verdict == NOT_ATTACKABLE
    assert any("learning rate is unknown" in reason for reason in bad.explanation.reasons)
    assert all(o.status == "skipped" for o in bad.attacks)
    assert by_node[303].status == "error" and "NaN" in by_node[303].message
    honest = by_node[101]     # no epochs or steps anywhere: explained, not attacked
    assert honest.status == "audited" and honest.verdict == NOT_ATTACKABLE
    assert any("number of local steps is unknown" in reason for reason in honest.explanation.reasons)


def _set_arrays(reply, **arrays):
    state = reply.content["arrays"].to_torch_state_dict()
    state.update(arrays)
    reply.content["arrays"] = ArrayRecord(dict(state))


def _second_array_record(reply):
    reply.content["more-arrays"] = ArrayRecord({"x": torch.zeros(3)})


def _without_arrays(reply):
    del reply.content["arrays"]


def _metric(key, value):
    def put(reply):
        reply.content["metrics"][key] = value
    return put


def _gate_config(reply):
    reply.content["gate"] = ConfigRecord({"gradleak-gate-psnr": "x" * 100_000, "gradleak-gate-action": b"\x00" * 64,
                                          "gradleak-gate-seconds": 10**400, "gradleak-gate-psnr-after": float("nan")})


# one client's (node 303's) reply made hostile -> what its audit record must say (error message or protocol problem)
HOSTILE_REPLIES = {
    "wrong shape": (lambda r: _set_arrays(r, **{"fc.weight": torch.zeros(3, 3)}), "error", "shape (3, 3) != the model's"),
    "broadcastable shape": (lambda r: _set_arrays(r, **{"fc.bias": torch.zeros(1)}), "error", "shape (1,) != the model's"),
    "infinite weight": (lambda r: _set_arrays(r, **{"fc.bias": torch.full((10,), float("inf"))}), "error",
                        "10 values are NaN or infinite"),
    "integer weights": (lambda r: _set_arrays(r, **{"fc.bias": torch.zeros(10, dtype=torch.int64)}), "error",
                        "dtype int64 is not floating point"),
    "missing arrays": (_without_arrays, "error", "expected exactly one ArrayRecord, found 0"),
    "two array records": (_second_array_record, "error", "expected exactly one ArrayRecord, found 2"),
    "huge num-examples": (_metric("num-examples", 2**62), "num_examples", "must be an integer"),
    "oversized metric list": (_metric("gradleak-lr", [0.1] * 200_000), "lr", "got [0.1, 0.1"),
    "non-numeric gate metrics": (_gate_config, "gate", "gradleak-gate-psnr"),
}


def _outcome(strategy, replies):
    """What a strategy's aggregate_train gives: the arrays' bytes and the metrics, or the exception it raised."""
    try:
        arrays, metrics = strategy.aggregate_train(1, replies)
    except Exception as error:  # noqa: BLE001 - FedAvg's own refusals must be the same with the wrapper
        return "raised", type(error).__name__, str(error)
    return "aggregated", None if arrays is None else array_bytes(arrays), None if metrics is None else dict(metrics)


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_each_hostile_reply_is_refused_in_one_line_and_fedavg_does_as_without_the_wrapper(case, digits16, data_spec):
    """Whatever FedAvg makes of a hostile reply (an aggregate, possibly poisoned, or its own
    refusal), the wrapped FedAvg makes exactly the same; the audit refuses that reply in one
    line naming the problem and audits the honest ones."""
    mutate, where, needle = HOSTILE_REPLIES[case]
    audit = audit_strategy(digits16, data_spec, attacks=[], numeric=False)
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    messages = list(audit.configure_train(1, global_record, ConfigRecord({}), Grid(PLAN)))
    copies = [replies_for(messages, digits16, data_spec) for _ in range(2)]
    for replies in copies:
        mutate(next(m for m in replies if m.metadata.src_node_id == 303))
    assert _outcome(audit, copies[0]) == _outcome(FedAvg(fraction_evaluate=0.0), copies[1])
    by_node = {r.node_id: r for r in audit.records}
    hostile = by_node[303]
    if where == "error":
        said = hostile.message
        assert hostile.status == "error" and hostile.verdict is None
    elif where == "gate":
        said = " ".join(hostile.notes)
        assert hostile.status == "audited" and hostile.gate == {} and len(hostile.notes) == 4
    else:
        said = hostile.protocol["problems"][where]
        assert hostile.status == "audited" and hostile.protocol[where] is None and not hostile.attacks
    assert needle in said and "\n" not in said and len(said) < 700, said
    assert len(json.dumps(hostile.to_json(), default=str)) < 20_000, "nothing the client sent is stored in bulk"
    for node in (101, 202):
        assert by_node[node].status == "audited" and by_node[node].verdict is not None


def test_error_replies_and_sampling(digits16, data_spec):
    from flwr.app import Error

    audit = audit_strategy(digits16, data_spec, attacks=[], clients=1, seed=3)
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    chosen = []
    for server_round in (1, 2, 3):
        messages = list(audit.configure_train(server_round, global_record, ConfigRecord({}), Grid(PLAN)))
        replies = replies_for(messages[1:], digits16, data_spec)
        replies.append(Message(Error(code=6, reason=f"{BLOCK_PREFIX}: test"), reply_to=messages[0]))
        audit.aggregate_train(server_round, replies)
        chosen.append([r.node_id for r in audit.records if r.server_round == server_round and r.status == "audited"])
    assert all(len(c) == 1 for c in chosen)
    blocked = [r for r in audit.records if r.status == "no update"]
    assert len(blocked) == 3 and all(BLOCK_PREFIX in r.message for r in blocked)
    again = audit_strategy(digits16, data_spec, attacks=[], clients=1, seed=3)
    assert again._sample(2, replies) == audit._sample(2, replies)   # seeded


def test_partly_shared_model_is_explained_not_attacked(digits16, data_spec):
    """Every client keeps its classifier bias local (personalisation): FedAvg aggregates the
    rest as usual; the audit says why it cannot attack."""
    audit = audit_strategy(digits16, data_spec, attacks=[("rgap", {})])
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    messages = list(audit.configure_train(1, global_record, ConfigRecord({}), Grid(PLAN)))
    copies = []
    for _ in range(2):
        replies = replies_for(messages, digits16, data_spec)
        for reply in replies:
            del reply.content["arrays"]["fc.bias"]
        copies.append(replies)
    wrapped, _ = audit.aggregate_train(1, copies[0])
    assert array_bytes(wrapped) == array_bytes(FedAvg().aggregate_train(1, copies[1])[0])
    assert all(r.verdict == NOT_ATTACKABLE and "shares 7 of the model's 8" in r.explanation.reasons[0]
               and "fc.bias" in r.explanation.reasons[0] and not r.attacks for r in audit.records)


def test_explanation_of_train_mode_batchnorm(digits16, data_spec):
    from gradleak.flower import explain, protocol_of

    built = ModelSpec("convnet", {"width": 4}, device="cpu").build(SHAPE, CLASSES)
    images, labels = client_batch(digits16, 202)
    update = gl.fedavg_update(built.module, images, labels, lr=0.1, local_steps=1, spec=data_spec)
    why = explain(update, built, protocol=protocol_of(training_metrics(4, 0.1, 4, local_steps=1)))
    assert why.verdict == APPROXIMATE and any(r.startswith("train-mode BatchNorm") for r in why.reasons)
    assert why.analysis["batch_size"] == 4


def _gate_run(digits16, data_spec, node, **options):
    """The gate around a ClientApp that trains like PLAN[node]; returns (message, reply)."""
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    message = Message(RecordDict({"arrays": global_record, "config": ConfigRecord(training_config(0.1, epochs=1))}),
                      node, MessageType.TRAIN)
    context = Context(run_id=7, node_id=node, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    gate = leakage_gate(SPEC, lambda ctx: client_batch(digits16, node), num_classes=CLASSES, attacks=[("rgap", {})],
                        data_spec=data_spec, time_budget=20.0, **options)
    call_next = (lambda msg, ctx: replies_for([msg], digits16, data_spec)[0])
    return message, gate(message, context, call_next), call_next(message, context)


def test_gate_blocks_above_the_threshold_and_fedavg_skips_it(digits16, data_spec):
    message, reply, _ = _gate_run(digits16, data_spec, 101, threshold_psnr=30.0, action="block")
    assert reply.has_error() and reply.error.reason.startswith(BLOCK_PREFIX) and "rgap" in reply.error.reason
    other = replies_for(instructions(message.content["arrays"])[1:2], digits16, data_spec)
    arrays, _ = FedAvg().aggregate_train(1, [reply, *other])
    assert array_bytes(arrays) == array_bytes(other[0].content["arrays"])    # only the other client counts


def test_gate_defends_above_the_threshold(digits16, data_spec):
    _, reply, undefended = _gate_run(digits16, data_spec, 101, threshold_psnr=30.0, action="defense",
                                     defense="gaussian:variance=1e-4")
    metrics = reply.content["metrics"]
    assert metrics[ACTION] == DEFENDED and metrics[PSNR] > 30.0
    assert metrics["gradleak-gate-psnr-after"] < 30.0     # R-GAP fails on the noisy update (-1: nothing recovered)
    sent, clean = reply.content["arrays"].to_torch_state_dict(), undefended.content["arrays"].to_torch_state_dict()
    assert list(sent) == list(clean) and all(sent[k].dtype == clean[k].dtype for k in sent)
    assert not torch.equal(sent["fc.weight"], clean["fc.weight"])


def test_gate_noise_is_fresh_every_round_and_the_same_in_a_rerun(digits16, data_spec):
    """Flower's simulation gives the same client another node id in every run: the gate's noise
    follows the partition and the server round, so a rerun sends the same defended update."""
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())

    def defended(node_id, server_round):
        config = ConfigRecord({**training_config(0.1, epochs=1), "server-round": server_round})
        message = Message(RecordDict({"arrays": global_record, "config": config}), node_id, MessageType.TRAIN)
        context = Context(run_id=7, node_id=node_id, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config={})
        gate = leakage_gate(SPEC, lambda ctx: client_batch(digits16, 101), num_classes=CLASSES, attacks=[("rgap", {})],
                            data_spec=data_spec, threshold_psnr=30.0, action="defense",
                            defense="gaussian:variance=1e-4", verify=False)
        reply = gate(message, context, lambda msg, ctx: replies_for([Message(msg.content, 101, MessageType.TRAIN)],
                                                                    digits16, data_spec)[0])
        assert reply.content["metrics"][ACTION] == DEFENDED
        return array_bytes(reply.content["arrays"])

    assert defended(101, 1) == defended(90210, 1)
    assert defended(101, 1) != defended(101, 2)


def test_gate_passes_below_the_threshold(digits16, data_spec):
    _, reply, undefended = _gate_run(digits16, data_spec, 202, threshold_psnr=18.0, action="block")
    assert not reply.has_error() and reply.content["metrics"][ACTION] in (PASSED, -1)
    assert array_bytes(reply.content["arrays"]) == array_bytes(undefended.content["arrays"])


def test_report_is_written(federation, tmp_path):
    audit, _, _ = federation
    page = write_report(tmp_path / "report", audit, names={101: "client <0>"}, accuracy={0: 0.1, 1: 0.2, 2: 0.25},
                        wall_seconds=12.0, notes=["hand-built replies"])
    html = page.read_text()
    assert "client &lt;0&gt;" in html and "<0>" not in html and EXACT in html and "secure-aggregation" in html
    data = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert len(data["records"]) == len(audit.records) and (tmp_path / "report" / "leakage.png").is_file()
    assert list((tmp_path / "report" / "grids").glob("round-001-node-101-rgap.png"))


# --------------------------------------------------------------------------- a real simulation
def _ray_processes(temp: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()[1:] if temp in line]


def _simulate(tmp_path, out: Path, *options: str) -> str:
    """The example app in Flower's simulation engine (3 clients, 2 rounds, gates blocking above
    30 dB), in its own session and Ray temp folder, bounded in time; every process it leaves
    is found by that folder, stopped by pid, and counted as a failure. Returns the log."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="glr")}
    command = [sys.executable, str(ROOT / "examples" / "flower_audit" / "run.py"), "--out", str(out), "--clients", "3",
               "--rounds", "2", "--iterations", "40", "--gate", "block", "--gate-threshold", "30", *options]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    left: list[int] = []
    try:
        log, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        log, _ = process.communicate()
        pytest.fail("the simulation did not finish in 300 s:\n" + log[-3000:])
    finally:
        deadline = time.monotonic() + 15       # Ray's processes exit shortly after the driver
        while _ray_processes(env["RAY_TMPDIR"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_processes(env["RAY_TMPDIR"])
        for pid in left:
            os.kill(pid, 9)
    assert process.returncode == 0, log[-3000:]
    assert not left, f"processes left running by the simulation: {left}"
    return log


@pytest.mark.slow
def test_real_simulation_audit_matches_gradleak_and_leaves_the_training_unchanged(tmp_path):
    """The example app in Flower's simulation engine: 3 clients, 2 rounds, gates on. The
    audit's PSNR per client equals gradleak's own attack on the captured update file, and
    the trained model equals that of the same federation under plain FedAvg (no wrapper),
    within float-summation-order tolerance: replies may reach FedAvg in another order in
    another run (the bit-identical check on the same replies is
    test_aggregate_bit_identical_with_and_without_the_wrapper)."""
    from safetensors.torch import load_file

    from gradleak.metrics import score
    from gradleak.runs import load_truth

    out, plain = tmp_path / "audit", tmp_path / "plain"
    _simulate(tmp_path, out)
    audit = json.loads((out / "audit.json").read_text())
    names = audit["names"]
    records = [r for r in audit["records"] if r["kind"] == "client"]
    assert {r["server_round"] for r in records} == {1, 2} and len(names) == 3
    blocked = [r for r in records if r["status"] == "no update"]
    assert blocked and all(names[str(r["node_id"])] == "client 0" for r in blocked)   # the one-image client
    audited = [r for r in records if r["status"] == "audited"]
    assert len(audited) == 4
    built = SPEC.build(SHAPE, CLASSES)
    compared = 0
    for record in audited:
        update = gl.load_update(record["capture"])
        images, labels = load_truth(Path(record["capture"]).with_suffix(".truth.safetensors"))
        for outcome in record["attacks"]:
            if outcome["status"] != "ok":
                continue
            attack = make_attack(outcome["attack"], built.module, gl.ThreatModel(),
                                 dict(audit["attacks"][[a["name"] for a in audit["attacks"]].index(outcome["attack"])]
                                      ["options"]))
            rec = attack_updates(attack, [update], quiet=True)
            offline = score(rec.images, images, predicted_labels=rec.labels, true_labels=labels, use_lpips=False)
            psnr = [r["psnr"] for r in sorted(offline.per_image, key=lambda r: r["index"])]
            assert len(psnr) == len(outcome["psnr"]) == len(images)
            assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(psnr, outcome["psnr"])), (psnr, outcome)
            compared += 1
    assert compared >= 4, "every audited update was attacked in-line and offline"
    assert (out / "report.html").is_file() and (out / "final.safetensors").is_file()

    _simulate(tmp_path, plain, "--no-audit")
    initial = built.module.state_dict()
    trained, reference = load_file(str(out / "final.safetensors")), load_file(str(plain / "final.safetensors"))
    assert list(trained) == list(reference)
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6)
    moved = max(float((trained[n] - initial[n].to(trained[n].dtype)).abs().max()) for n in trained)
    assert moved > 1e-3, "two rounds of training changed the model (the comparison is not trivial)"


def test_clients_are_named_by_their_partition_and_audit_metrics_are_not_averaged(digits16, data_spec):
    """A reply's partition-id names the client in the log line and the report ('client 2 (node ...)');
    metrics_without_audit keeps the gradleak-* and partition-id metrics out of FedAvg's weighted
    averages (a mean 'gate PSNR after' of -0.66 dB means nothing) and leaves the arrays untouched."""
    from gradleak.flower import metrics_without_audit

    audit = LeakageAuditStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3,
                                        train_metrics_aggr_fn=metrics_without_audit), SPEC, input_shape=SHAPE,
                                 num_classes=CLASSES, data_spec=data_spec, attacks=())
    plain = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    global_record = ArrayRecord(SPEC.build(SHAPE, CLASSES).module.state_dict())
    messages = list(audit.configure_train(1, global_record, ConfigRecord({}), Grid(PLAN)))
    partition = {node: k for k, node in enumerate(sorted(PLAN))}

    def metrics(node):
        _, n, batch = PLAN[node]
        return {**training_metrics(n, 0.1, batch, epochs=1), "partition-id": partition[node], "train-loss": 1.5}

    wrapped, wrapped_metrics = audit.aggregate_train(1, replies_for(messages, digits16, data_spec, metrics))
    reference, reference_metrics = plain.aggregate_train(1, replies_for(messages, digits16, data_spec, metrics))
    assert array_bytes(wrapped) == array_bytes(reference)
    assert set(wrapped_metrics) == {"train-loss"} and wrapped_metrics["train-loss"] == pytest.approx(1.5)
    assert any(k.startswith("gradleak-") for k in reference_metrics) and "partition-id" in reference_metrics
    for record in audit.records:
        assert record.client == f"client {partition[record.node_id]}"
        assert record.line().startswith(f"round 1, client {partition[record.node_id]} (node {record.node_id}):")
