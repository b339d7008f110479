"""A live audit without ground truth, on a Flower app not written for gradleak (``live_app``:
its own model outside the zoo, a couple of real digits per client, plain FedAvg, Flower's
names for the training settings), wrapped with ``LeakageAuditStrategy`` and no ``truth=``.

The fast tests drive the app's own ``train`` function with hand-built Messages; the slow one
runs it in Flower's simulation engine. The test holds the clients' data, the audit does not:
what the audit certifies exact is checked against it here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flower_support import Grid, flower_identity  # noqa: E402,F401 (a module-wide fixture)

from gradleak.flower import protocol_of, write_report  # noqa: E402
from gradleak.flower.capture import load_reconstruction  # noqa: E402
from gradleak.flower.explain import EXACT, NOT_ATTACKABLE  # noqa: E402
from gradleak.flower.report import leakage_series  # noqa: E402
from gradleak.metrics import match, psnr  # noqa: E402
from live_app import app as live  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODES = {11: 0, 22: 1, 33: 2}        # node id -> partition
AUTO = ("auto", {"iterations": 20})


def replies(messages, run_config=live.RUN_CONFIG):
    """The app's own ClientApp train function on each instruction (deterministic)."""
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        context = Context(run_id=7, node_id=node, node_config={"partition-id": NODES[node]}, state=RecordDict(),
                          run_config=dict(run_config))
        out.append(live.train(message, context))
    return out


def array_bytes(record):
    return {k: (v.dtype, tuple(v.shape), bytes(v.data)) for k, v in record.items()}


def federation(strategy, rounds=2, run_config=live.RUN_CONFIG):
    """Rounds through ``strategy`` and, on copies of the same replies, a plain FedAvg: the two
    global models after each round."""
    plain = FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    arrays = ArrayRecord(live.tiny_net().state_dict())
    pairs = []
    for server_round in range(1, rounds + 1):
        config = ConfigRecord({"lr": float(run_config["learning-rate"])})
        messages = list(strategy.configure_train(server_round, arrays, config, Grid(NODES)))
        audited, _ = strategy.aggregate_train(server_round, replies(messages, run_config))
        reference, _ = plain.aggregate_train(server_round, replies(messages, run_config))
        pairs.append((audited, reference))
        arrays = audited
    return pairs


@pytest.fixture(scope="module")
def live_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("live")
    strategy = live.audited(FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3),
                            dict(live.RUN_CONFIG), out, attacks=AUTO, secure_aggregation=True)
    pairs = federation(strategy)
    page = write_report(out, strategy)
    return strategy, pairs, out, page


def test_flower_names_are_read_and_their_source_recorded(live_audit):
    strategy, _, _, _ = live_audit
    record = next(r for r in strategy.records if r.server_round == 1 and r.node_id == 33)
    p = record.protocol
    assert (p["lr"], p["local_steps"], p["batch_size"], p["num_examples"], p["epochs"]) == (0.1, 2, 2, 4, 1)
    assert p["sources"]["lr"] == "config" and p["sources"]["local_steps"] == "metrics"
    assert p["sources"]["epochs"] == "declared" and p["keys"]["epochs"] == "local-epochs"
    assert p["keys"]["local_steps"] == "local-steps" and p["keys"]["batch_size"] == "batch-size"
    # the client chose minibatches of 2 where the run config says 32: noticed, and the client's value used
    assert p["problems"] == {"batch_size": "the client reports 2, the server declared 32; using the client's value"}
    others = [r.protocol for r in strategy.records if r.node_id in (11, 22)]
    assert all(o["batch_size"] == 2 and o["local_steps"] == 1 and not o["problems"] for o in others)


def test_certified_clients_get_their_own_images_back_without_any_truth(live_audit):
    strategy, _, out, _ = live_audit
    certified = 0
    for record in (r for r in strategy.records if r.kind == "client"):
        assert record.truth is None and record.status == "audited"
        images, _ = live.load_partition(NODES[record.node_id])
        if NODES[record.node_id] in (0, 1):         # one local step of 2 images: Qian's condition holds
            assert record.verdict == EXACT
            best = record.best
            assert best.attack == "qian" and best.certified and best.residual.value <= best.residual.tolerance
            assert [o.attack for o in record.attacks] == ["qian"], "auto stops at the first certified exact"
            saved, labels, meta = load_reconstruction(best.saved)
            assert Path(best.saved).parent == Path(record.capture).parent and meta["residual"]["certified"]
            matched = saved[match(saved, images)]
            assert float(psnr(matched, images).min()) > 60          # the clients' images, exactly
            assert sorted(labels.tolist()) == sorted(live.load_partition(NODES[record.node_id])[1].tolist())
            certified += 1
        else:                                       # two local steps: only gradient matching, never certified
            assert [o.attack for o in record.attacks] == ["fedavg"]
            assert not record.certified and record.best_residual > 1e-2
    assert certified == 4


def test_the_sum_is_attacked_as_an_approximation_and_never_certified(live_audit):
    strategy, _, _, _ = live_audit
    sums = [r for r in strategy.records if r.kind == "secure-aggregation"]
    assert len(sums) == 2 and all(r.status == "audited" and not r.certified for r in sums)
    assert all(any("not the delta of any one protocol" in x for x in r.explanation.reasons) for r in sums)
    assert all(o.attack == "inverting-gradients" for r in sums for o in r.attacks)  # no closed form for the sum


def test_report_shows_reconstructions_certified_marks_and_the_residual_per_client_and_round(live_audit):
    strategy, _, out, page = live_audit
    html = page.read_text()
    assert html.count("CERTIFIED EXACT") >= 4 and "update residual" in html
    for record in strategy.records:
        who = "sum" if record.node_id is None else f"node-{record.node_id}"
        for outcome in record.attacks:
            assert (out / "grids" / f"round-{record.server_round:03d}-{who}-{outcome.attack}.png").is_file()
    drawn = leakage_series(strategy.records)
    assert not drawn["psnr"], "no truth: no PSNR"
    assert {who: [r for r, _ in points] for who, points in drawn["residual"].items()} == {
        "node 11": [1, 2], "node 22": [1, 2], "node 33": [1, 2], "secure-aggregation sum": [1, 2]}
    stored = json.loads((out / "audit.json").read_text())
    certified = [r for r in stored["records"] if r["certified"]]
    assert len(certified) == 4 and all(r["best_residual"] < 1e-3 for r in certified)


def test_the_final_model_is_plain_fedavg_bit_for_bit(live_audit):
    _, pairs, _, _ = live_audit
    for audited, reference in pairs:
        assert array_bytes(audited) == array_bytes(reference)


def test_unknown_steps_leave_the_client_and_the_sum_unattacked_with_the_reason(tmp_path):
    """Without the server's declaration and without local-steps in the replies, the clients'
    steps are unknown: no client is attacked, and neither is their sum."""
    run_config = {k: v for k, v in live.RUN_CONFIG.items()}
    strategy = live.audited(FedAvg(fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3), {}, tmp_path,
                            attacks=AUTO, secure_aggregation=True)

    def no_steps(messages, config=run_config):
        out = replies(messages, config)
        for reply in out:
            del reply.content["metrics"]["local-steps"]
        return out

    arrays = ArrayRecord(live.tiny_net().state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), Grid(NODES)))
    strategy.aggregate_train(1, no_steps(messages))
    clients = [r for r in strategy.records if r.kind == "client"]
    assert all(r.verdict == NOT_ATTACKABLE and all(o.status == "skipped" for o in r.attacks) for r in clients)
    summed = next(r for r in strategy.records if r.kind == "secure-aggregation")
    assert summed.verdict == NOT_ATTACKABLE and summed.update is None and all(o.status == "skipped"
                                                                             for o in summed.attacks)
    assert "node 11: local_steps" in summed.explanation.reasons[0] and "so is the sum's" in summed.explanation.reasons[0]


def test_contract_reads_flower_names_on_every_side():
    p = protocol_of({"num-examples": 6, "train_loss": 0.3}, {"lr": 0.05},
                    {"local-epochs": 2, "batch-size": 4, "learning-rate": 0.1})
    assert (p.lr, p.epochs, p.batch_size, p.local_steps) == (0.05, 2, 4, 4)
    assert p.sources == {"lr": "config", "batch_size": "declared", "epochs": "declared", "local_steps": "computed",
                         "num_examples": "metrics", "mode": "unknown"}
    assert "the config asked for 0.05, the server declared 0.1" in p.problems["lr"]
    p = protocol_of({"num-examples": 6, "local_steps": 3, "batch_size": 2}, {"learning_rate": 0.2})
    assert (p.lr, p.local_steps, p.batch_size) == (0.2, 3, 2) and p.keys["local_steps"] == "local_steps"
    p = protocol_of({"num-examples": 6, "gradleak-lr": 0.1, "lr": 0.3})
    assert p.lr == 0.1 and "gradleak-lr=0.1, lr=0.3" in p.problems["lr"]


def test_a_bad_declaration_is_refused_in_one_line(tmp_path):
    from gradleak.errors import ConfigError

    with pytest.raises(ConfigError, match="protocol: lr: declared learning-rate"):
        live.audited(FedAvg(), {"learning-rate": -1.0}, tmp_path)
    with pytest.raises(ConfigError, match=r"protocol\[5\]: local_steps"):
        live.audited(FedAvg(), {5: {"local-steps": "many"}}, tmp_path)
    with pytest.raises(ConfigError, match="'auto' plans the attacks itself"):
        live.audited(FedAvg(), {}, tmp_path, attacks=["auto", "qian"])
    with pytest.raises(ConfigError, match="no attack it may run takes option 'iteratons'"):
        live.audited(FedAvg(), {}, tmp_path, attacks=("auto", {"iteratons": 3}))


def _processes_under(folder: str, wait: float = 15.0) -> list[int]:
    """Pids whose command line names ``folder``, after giving them ``wait`` seconds to exit."""
    deadline = time.monotonic() + wait
    while True:
        table = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
        found = [int(line.split(None, 1)[0]) for line in table if folder in line]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.slow
def test_the_app_in_flowers_simulation_engine(tmp_path):
    """The same app in Flower's simulation engine (Ray), 3 clients, 2 rounds, in its own session
    under a timeout: the report marks the four one-step updates certified exact, and their
    saved reconstructions are the clients' images."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="gll"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "LIVE_APP_OUT": str(tmp_path / "out")}
    script = ("from flwr.simulation import run_simulation; from live_app import app; "
              "run_simulation(server_app=app.server, client_app=app.client, num_supernodes=3, "
              "backend_config={'client_resources': {'num_cpus': 0.5}})")
    try:
        process = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=400, start_new_session=True)
    finally:
        left = _processes_under(env["RAY_TMPDIR"])
        for pid in left:                    # Ray's processes of this run only, found by its own temp folder
            os.kill(pid, 9)
    assert process.returncode == 0, process.stderr[-3000:]
    assert not left, f"processes left running by the simulation: {left}"
    stored = json.loads((tmp_path / "out" / "audit.json").read_text())
    clients = [r for r in stored["records"] if r["kind"] == "client"]
    assert len(clients) == 6 and sum(r["certified"] for r in clients) == 4
    for record in (r for r in clients if r["certified"]):
        best = next(o for o in record["attacks"] if o["certified"])
        saved, _, _ = load_reconstruction(best["reconstruction"])
        partition = next(p for p in range(3) if float(psnr(saved[match(saved, live.load_partition(p)[0])],
                                                           live.load_partition(p)[0]).min()) > 60)
        assert partition in (0, 1)
    assert "CERTIFIED EXACT" in (tmp_path / "out" / "report.html").read_text()


def test_the_client_gate_runs_auto_and_blocks_an_exactly_recoverable_update():
    """The gate with attacks='auto' on the app's own ClientApp: the analyser's plan (Qian) gets
    the client's two digits back above the threshold, so the reply is refused."""
    from flwr.app import Message, MessageType

    from gradleak.flower import leakage_gate
    from gradleak.flower.gate import BLOCK_PREFIX
    from gradleak.models import ModelSpec

    gate = leakage_gate(ModelSpec("live_app.app:tiny_net", device="cpu"), lambda context: live.load_partition(0),
                        num_classes=live.CLASSES, attacks=AUTO, threshold_psnr=60.0, action="block", time_budget=20.0)
    message = Message(RecordDict({"arrays": ArrayRecord(live.tiny_net().state_dict()),
                                  "config": ConfigRecord({"lr": 0.1})}), 11, MessageType.TRAIN)
    context = Context(run_id=7, node_id=11, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=dict(live.RUN_CONFIG))
    reply = gate(message, context, live.train)
    assert reply.has_error() and reply.error.reason.startswith(BLOCK_PREFIX) and "qian" in reply.error.reason
