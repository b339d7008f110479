"""benchmarks/trained_grid.py's log reading: ``A+B`` tags are the attacker's choice by matching loss."""

from __future__ import annotations

import json

import pytest

from benchmark_support import benchmark_module


def _log(folder, tag, rows):
    (folder / f"attacks-{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_choice_by_matching_loss_keeps_only_shared_attacks(tmp_path):
    def row(key, tag, loss, psnr):
        return {"key": key, "tag": tag, "matching_loss": loss, "psnr": [psnr]}

    _log(tmp_path, "default", [row("a", "default", 0.02, 20.0), row("b", "default", 0.01, 30.0),
                               row("only-default", "default", 0.0, 50.0)])
    _log(tmp_path, "spec", [row("a", "spec", 0.01, 12.0), row("b", "spec", 0.05, 35.0)])
    with benchmark_module("trained_grid") as grid:
        chosen = {r["key"]: r for r in grid.rows_of(tmp_path, "default+spec")}
        plain = grid.rows_of(tmp_path, "default")
    assert set(chosen) == {"a", "b"}  # an attack one variant lacks is not compared
    assert chosen["a"]["tag"] == "spec" and chosen["a"]["psnr"] == [12.0]  # lower loss, though lower PSNR
    assert chosen["b"]["tag"] == "default"
    assert len(plain) == 3


def test_a_rerun_of_chosen_held_out_images_is_compared_where_it_ran(tmp_path):
    def row(key, tag, loss, **extra):
        return {"key": key, "tag": tag, "matching_loss": loss, "psnr": [loss], **extra}

    held = "adam|eval|b1|held-out|{}"
    _log(tmp_path, "base", [row(held.format(1), "base", 0.02, set="held-out"),
                            row(held.format(2), "base", 0.01, set="held-out")])
    _log(tmp_path, "rerun", [row("adam|eval|b1|chosen-held-out|1", "rerun", 0.005, set="chosen-held-out")])
    with benchmark_module("trained_grid") as grid:
        strict = grid.rows_of(tmp_path, "base+rerun")
        chosen = {r["key"]: r for r in grid.rows_of(tmp_path, "base+rerun?")}
        with pytest.raises(SystemExit, match="every variant is marked"):
            grid.rows_of(tmp_path, "base?+rerun?")
    assert [r["key"] for r in strict] == [held.format(1)]   # the rerun counts as the held-out attack it repeats
    assert set(chosen) == {held.format(1), held.format(2)}   # "?": image 2 keeps its only variant
    assert chosen[held.format(1)]["tag"] == "rerun" and chosen[held.format(1)]["set"] == "held-out"
    assert chosen[held.format(1)]["file"] == "adam|eval|b1|chosen-held-out|1"   # its saved reconstruction
    assert chosen[held.format(2)]["tag"] == "base"


def test_a_batch_attack_records_each_images_share_and_as_batch_reconstructs_fewer():
    """Eval mode, batch 4: every original's share of the client's update (summing to 1) and the share of the
    reconstruction matched to it; ``as_batch=1`` returns one image matched to one original."""
    import torch

    import gradleak as gl
    from gradleak.data import load_builtin

    digits = load_builtin("digits", n=4, size=32)
    torch.manual_seed(0)
    module = gl.build_model("convnet", tuple(digits.images.shape[1:]), 10, width=4).eval()
    record = {"data_spec": {"mean": [0.3], "std": [0.3]}}
    images, labels = digits.images[:4], digits.labels[:4]
    with benchmark_module("trained_grid") as grid:
        full, _ = grid.attack_one(module, record, images, labels, "eval", {"iterations": 20, "record_every": 10})
        one, rec = grid.attack_one(module, record, images, labels, "eval", {"iterations": 20, "as_batch": 1})
        train, _ = grid.attack_one(module, record, images, labels, "train", {"iterations": 2})
    assert len(full["true_shares"]) == 4 and abs(sum(full["true_shares"]) - 1) < 1e-12
    assert all(v is not None and 0 <= v <= 1 for v in full["reconstruction_shares"])
    assert rec.shape[0] == 1 and sum(m is not None for m in one["matched_to"]) == 1
    assert one["true_shares"] == full["true_shares"]
    assert [v is None for v in one["reconstruction_shares"]] == [m is None for m in one["matched_to"]]
    assert "true_shares" not in train            # train-mode BatchNorm: no image has a gradient of its own


def test_batch_shares_summary_counts_carried_images_and_the_dominant_one(tmp_path):
    def row(key, shares, psnr, rec_shares, matched=None):
        return {"key": key, "net": "adam", "mode": "eval", "batch": 4, "true_shares": shares, "psnr": psnr,
                "reconstruction_shares": rec_shares, "matched_to": matched or [0, 1, 2, 3]}

    full = [row("a", [0.9, 0.05, 0.04, 0.01], [20.0, 10.0, 8.0, 6.0], [0.8, 0.1, 0.05, 0.05]),
            row("b", [0.001, 0.997, 0.001, 0.001], [5.0, 12.0, 7.0, 9.0], [0.5, 0.3, 0.1, 0.1])]
    fewer = [row("a", [0.9, 0.05, 0.04, 0.01], [25.0, None, None, None], [1.0, None, None, None],
                 [0, None, None, None]),
             row("b", [0.001, 0.997, 0.001, 0.001], [None, None, 6.0, None], [None, None, 1.0, None],
                 [None, None, 0, None])]
    with benchmark_module("batch_shares", also_imports=("trained_grid",)) as shares:
        s = shares.summarise(full, fewer)
    assert s["carried"] == 5 and s["psnr_carried"] == pytest.approx((20 + 10 + 8 + 6 + 12) / 5)
    assert s["dominant_psnr"] == pytest.approx(16.0) and s["dominant_recognisable"] == 1
    assert s["identified_truth_free"] == 1          # batch b's reconstruction shares point elsewhere
    assert s["fewer_matched_dominant"] == 1 and s["fewer_psnr"] == pytest.approx(15.5)
