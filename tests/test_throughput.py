"""Throughput: several updates attacked in one vmap give the reconstructions of one at a time;
an audit in worker processes gives the numbers of one in this process, and keeps what
arrived when stopped."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from gradleak import ThreatModel, build_model, fedavg_update, fedsgd_update
from gradleak.attacks import get_attack
from gradleak.attacks._targets import MAX_SLOTS, target_chunks
from gradleak.audit import run_audit
from gradleak.audit import runner as audit_runner
from gradleak.errors import ConfigError
from gradleak.metrics import psnr


def _monitors(truths):
    return [lambda images, truth=truth: {"psnr": float(psnr(images, truth).mean())} for truth in truths]


def test_batched_targets_give_the_reconstructions_of_one_at_a_time(photos):
    lenet = build_model("lenet", (3, 32, 32), 10, seed=3)
    updates = [fedsgd_update(lenet, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in range(4)]
    truths = [photos.images[k:k + 1] for k in range(4)]
    runs = {}
    for mode in ("loop", "auto"):
        attack = get_attack("inverting-gradients")(lenet, ThreatModel(), iterations=30, record_every=10,
                                                   batched_targets=mode)
        runs[mode] = list(attack.reconstruct_many(updates, monitors=_monitors(truths)))
    for alone, together in zip(runs["loop"], runs["auto"]):
        assert torch.allclose(alone.images, together.images, atol=1e-4)
        assert torch.equal(alone.labels, together.labels)
        assert alone.history["psnr"]["y"] == pytest.approx(together.history["psnr"]["y"], abs=1e-3)
        assert "one vmap over 4 targets x 1 restart(s)" in together.notes[-1]
        assert not any("vmap over" in note for note in alone.notes)
    # each target was matched against its own update: the images differ from each other
    assert float((runs["auto"][0].images - runs["auto"][1].images).abs().max()) > 0.1


def test_batched_fedavg_deltas_with_restarts_equal_one_at_a_time(photos):
    lenet = build_model("lenet", (3, 32, 32), 10, seed=4)
    deltas = [fedavg_update(lenet, photos.images[2 * k:2 * k + 2], photos.labels[2 * k:2 * k + 2], lr=0.05,
                            local_steps=2, local_batch_size=1, share_labels=True) for k in range(3)]
    results = {mode: list(get_attack("fedavg")(lenet, ThreatModel(labels_known=True), iterations=20, restarts=2,
                                               batched_targets=mode).reconstruct_many(deltas))
               for mode in ("loop", "auto")}
    for alone, together in zip(results["loop"], results["auto"]):
        assert torch.allclose(alone.images, together.images, atol=1e-4)
        assert set(alone.history) == set(together.history) == {"loss[0]", "loss[1]"}


def test_target_chunks_follow_the_conditions(photos):
    lenet = build_model("lenet", (3, 32, 32), 10, seed=0)
    ig = get_attack("inverting-gradients")
    updates = [fedsgd_update(lenet, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in range(6)]
    assert target_chunks(ig(lenet, ThreatModel()), updates) == [list(range(6))]
    assert target_chunks(ig(lenet, ThreatModel(), restarts=MAX_SLOTS // 2), updates) == [[0, 1], [2, 3], [4, 5]]
    for refused in ({"patience": 5}, {"optimizer": "lbfgs"}, {"batched_targets": "loop"},
                    {"restarts": 2, "batched_restarts": "loop"}):
        assert target_chunks(ig(lenet, ThreatModel(), **refused), updates) == [[k] for k in range(6)], refused
    # a batch of 2 among batch-1 updates, and updates at other weights, start chunks of their own
    other = build_model("lenet", (3, 32, 32), 10, seed=1)
    weights = {n: p.detach() for n, p in other.named_parameters()}
    mixed = updates[:2] + [fedsgd_update(lenet, photos.images[:2], photos.labels[:2])] + updates[2:4]
    mixed += [fedsgd_update(other, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in (4, 5)]
    for update in mixed[-2:]:
        object.__setattr__(update, "weights", weights)
    assert target_chunks(ig(lenet, ThreatModel()), mixed) == [[0, 1], [2], [3, 4], [5, 6]]
    convnet = build_model("convnet", (3, 32, 32), 10, width=8).eval()  # BatchNorm: one at a time
    bn_updates = [fedsgd_update(convnet, photos.images[k:k + 1], photos.labels[k:k + 1]) for k in range(2)]
    assert target_chunks(ig(convnet, ThreatModel()), bn_updates) == [[0], [1]]
    with pytest.raises(ConfigError, match="monitors: one per update expected, got 1 for 6 updates"):
        list(ig(lenet, ThreatModel()).reconstruct_many(updates, monitors=[None]))


AUDIT = """
name: pool audit
data: {name: photos, n: 2, size: 32}
models: [lenet]
attacks:
  - {name: inverting-gradients, options: {iterations: 12, record_every: 4}}
defenses: [none, "gaussian:variance=1e-4", "pruning:ratio=0.5"]
utility: {data: digits, model: mlp, clients: 2, rounds: 2, eval_every: 1}
"""


def _numbers(result):
    cells = [(c.cell_id, c.status, c.psnr, c.ssim, c.summary.get("label_accuracy")) for c in result.cells]
    return cells, {k: v["accuracy"] for k, v in result.utility.items()}


@pytest.mark.slow
def test_an_audit_in_worker_processes_gives_the_numbers_of_one_in_process(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    here = run_audit(config, tmp_path / "here", quiet=True)
    pooled = run_audit(config, tmp_path / "pool", quiet=True, jobs=2)
    assert not pooled.interrupted and len(pooled.cells) == 3 and len(pooled.utility) == 3
    assert _numbers(pooled) == _numbers(here)
    assert (tmp_path / "pool" / "report.html").is_file()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_ctrl_c_during_a_pooled_audit_keeps_what_arrived_and_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    whole = run_audit(config, tmp_path / "whole", quiet=True)
    original, written = audit_runner.atomic_write_json, []

    def ctrl_c_at_the_second_cell(path, value, *args, **kwargs):
        if path.name == "cell.json":
            written.append(path)
            if len(written) == 2:
                raise KeyboardInterrupt
        return original(path, value, *args, **kwargs)

    monkeypatch.setattr(audit_runner, "atomic_write_json", ctrl_c_at_the_second_cell)
    out = tmp_path / "cut"
    cut = run_audit(config, out, quiet=True, jobs=2)
    assert cut.interrupted and len(cut.cells) == 1
    assert len(list(out.glob("cells/*/cell.json"))) == 1
    assert not multiprocessing.active_children()  # the workers were stopped
    monkeypatch.setattr(audit_runner, "atomic_write_json", original)
    resumed = run_audit(config, out, quiet=True, jobs=2)
    assert not resumed.interrupted and _numbers(resumed) == _numbers(whole)


@pytest.mark.parametrize("jobs, message", [(0, "jobs: expected 'auto' or an integer from 1 to 1024, got 0"),
                                           ("many", "jobs: expected 'auto' or an integer from 1 to 1024, got 'many'"),
                                           (True, "got True")])
def test_bad_jobs_are_refused_in_one_line(tmp_path, jobs, message):
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_audit(config, tmp_path / "out", quiet=True, jobs=jobs)
    assert not (tmp_path / "out").exists()


def test_jobs_and_ray_are_not_combined(tmp_path):
    pytest.importorskip("ray")
    config = tmp_path / "audit.yaml"
    config.write_text(AUDIT)
    with pytest.raises(ConfigError, match="jobs: local worker processes or Ray, not both"):
        run_audit(config, tmp_path / "out", quiet=True, jobs=2, ray="auto")


PLAN = """
name: plan
data: {name: photos, n: 4, size: 32}
models: [lenet, mlp]
attacks:
  - {name: inverting-gradients, options: {iterations: 10}, models: [lenet]}
  - {name: dlg, options: {iterations: 2}, models: [lenet]}
  - {name: fc-bias, models: [mlp]}
defenses: [none, "gaussian:variance=1e-4", "local-steps:steps=2,lr=0.1", "secure-aggregation:clients=2",
           "pruning:ratio=0.5", half, int8, sign, soteria, "clipping:max_norm=1", "pruning:ratio=0.7"]
utility: false
"""


def test_cells_attacked_together_are_planned_over_the_whole_grid(tmp_path):
    """IG on LeNet batches across defense entries (8 cells x 4 images = 32 samples a group) but
    not with the entries that change the protocol; L-BFGS DLG and the closed form stay in their
    update-sharing groups; what is left to compute never changes a group's members."""
    from gradleak.audit._batch import plan_groups
    from gradleak.audit.config import load_audit_config

    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    config = load_audit_config(path)
    specs, stacks = audit_runner.audit_cells(config), config.defense_stacks()
    context = audit_runner._load_context(config)
    ig = [i for i, s in enumerate(specs) if s.attack.name == "inverting-gradients"]
    kept = [i for i in ig if specs[i].defense_index not in (2, 3)]  # not local-steps, not secure-aggregation
    groups = plan_groups(config, specs, stacks, list(range(len(specs))), context)
    assert groups[0] == kept[:8] and kept[8:] not in groups[:1]
    assert [kept[8], kept[8] + 1] in groups, "a lone cell left over stays in its update-sharing group (with DLG)"
    alone = {i for g in groups[1:] for i in g}
    assert alone == set(range(len(specs))) - set(kept[:8])
    for group in groups[1:]:  # the others: one model, defense entry and batch size each
        assert len({(specs[i].model.label, specs[i].defense_index) for i in group}) == 1
    # resuming with one cell of the batched group left: the group is computed whole, with the same members
    assert plan_groups(config, specs, stacks, [kept[5]], context) == [kept[:8]]
    assert plan_groups(config, specs, stacks, [ig[2]], context) == [[ig[2]]]  # local-steps: alone
