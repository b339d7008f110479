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
