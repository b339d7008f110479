"""The Flower audit on a text model: a small GPT-2 federation, hand-built Messages (no simulation),
held-out sentences of the built-in corpus. The audit captures each client's update, explains it
(the span condition in words), attacks it (``attacks="auto"``: the span attack, certified exact by
its update residual; explicit attacks on a classifier) and leaves FedAvg's model bit for bit as it
is without the wrapper."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

import gradleak as gl  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from gradleak.flower import LeakageAuditStrategy, training_metrics, write_report  # noqa: E402
from gradleak.flower.explain import APPROXIMATE, EXACT  # noqa: E402
from gradleak.models import ModelSpec  # noqa: E402
from gradleak.text import load_text  # noqa: E402

from flower_support import flower_identity  # noqa: E402,F401 (a module-wide fixture)

LENGTH = 12
TINY = {"width": 96, "layers": 2, "heads": 2, "positions": 64}
# node id -> (first sequence, sequences, minibatch): 3 sequences in one step, 4 in two steps of 2
PLAN = {11: (0, 3, 3), 22: (3, 4, 2)}


@pytest.fixture(scope="module")
def text():
    return load_text(n=8, length=LENGTH)            # held-out topics


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def replies(messages, spec, text, plan):
    """Each client's train reply: its full local weights after its local SGD, and its training metrics."""
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        start, n, batch = plan[node]
        built = spec.build((LENGTH,), 2)
        built.module.load_state_dict(message.content["arrays"].to_torch_state_dict())
        ids, labels = text.ids[start:start + n], text.labels[start:start + n]
        target = ids if built.loss == "causal_lm" else labels
        update = gl.fedavg_update(built.module, ids, target, lr=0.1, epochs=1, local_batch_size=batch, loss=built.loss,
                                  seed=node)
        state = {k: v.clone() for k, v in built.module.state_dict().items()}
        for name, delta in update.tensors.items():
            state[name] = state[name] + delta
        content = RecordDict({"arrays": ArrayRecord(state),
                              "metrics": MetricRecord(training_metrics(n, 0.1, batch, epochs=1))})
        out.append(Message(content, reply_to=message))
    return out


def one_round(audit, spec, text, plan):
    arrays = ArrayRecord(spec.build((LENGTH,), 2).module.state_dict())
    messages = list(audit.configure_train(1, arrays, ConfigRecord({}), Grid(plan)))
    plain = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(plan), min_train_nodes=len(plan))
    wrapped, _ = audit.aggregate_train(1, replies(messages, spec, text, plan))
    reference, _ = plain.aggregate_train(1, replies(messages, spec, text, plan))
    return wrapped, reference


def array_bytes(record):
    return {k: (v.dtype, tuple(v.shape), bytes(v.data)) for k, v in record.items()}


def test_audit_of_a_language_model_explains_attacks_captures_and_changes_nothing(text, tmp_path):
    from gradleak.pipeline import attack_file
    from gradleak.text.pipeline import save_text_truth

    spec = ModelSpec("gpt2", TINY, seed=3)
    audit = LeakageAuditStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2), spec,
                                 input_shape=(LENGTH,), num_classes=2, capture_dir=tmp_path,
                                 truth=lambda node, r: (text.ids[PLAN[node][0]:sum(PLAN[node][:2])], None))
    wrapped, reference = one_round(audit, spec, text, PLAN)
    assert array_bytes(wrapped) == array_bytes(reference)                    # FedAvg's model, bit for bit
    one, two = (next(r for r in audit.records if r.node_id == node) for node in PLAN)
    assert one.verdict == EXACT
    assert any("3 x 11 = 33 input positions < the model width d = 96" in r for r in one.explanation.reasons)
    assert one.attacks, (one.status, one.message, one.notes)
    dager = one.attacks[0]
    assert dager.attack == "dager" and dager.certified and dager.text["exact_rate"] == 1.0
    assert two.verdict == APPROXIMATE and any("2 local steps" in r for r in two.explanation.reasons)
    assert two.attacks[0].status == "skipped" and "a sum of steps" in two.attacks[0].message
    # the captured file is a text update: gradleak attack reads it as text and finds what the audit found
    save_text_truth(tmp_path / "truth.safetensors", text.ids[:3])
    run = attack_file(one.capture, "dager", tmp_path / "offline", truth=tmp_path / "truth.safetensors", quiet=True)
    assert run.scores.summary["exact_rate"] == 1.0
    page = write_report(tmp_path / "report", audit).read_text()
    assert "CERTIFIED" in page or "certified" in page


def test_explicit_attacks_on_a_classifier(text, tmp_path):
    spec = ModelSpec("gpt2-classifier", {**TINY, "layers": 3}, seed=1, dtype="float64")   # float32: see docs/text.md
    plan = {33: (0, 2, 2)}
    audit = LeakageAuditStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1), spec,
                                 input_shape=(LENGTH,), num_classes=2, attacks=["dager", "bag-of-words"],
                                 truth=lambda node, r: (text.ids[:2], text.labels[:2]))
    wrapped, reference = one_round(audit, spec, text, plan)
    assert array_bytes(wrapped) == array_bytes(reference)
    dager, bag = audit.records[0].attacks
    assert dager.status == "ok" and dager.text["exact_rate"] == 1.0 and dager.certified   # labels solved in closed form
    assert bag.status == "ok" and bag.text["token_set_recall"] == 1.0 and not bag.certified
    assert torch.is_tensor(bag.reconstruction.tokens)
