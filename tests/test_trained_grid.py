"""benchmarks/trained_grid.py's log reading: ``A+B`` tags are the attacker's choice by matching loss."""

from __future__ import annotations

import json

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
