"""benchmarks/gpu_check.py, the GPU check, run dry on the CPU (``--device cpu --quick``): every
check runs end to end at a few iterations and the one JSON holds each check's figures."""

from __future__ import annotations

import json

import pytest
from benchmark_support import benchmark_module


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    with benchmark_module("gpu_check", also_imports=("bench", "gradinversion")) as module:
        report = module.main(["--device", "cpu", "--quick", "--out", str(out)])
        fitted = _fit_lenet(module)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    checks = report["checks"]
    assert list(checks) == list(module.CHECKS)
    assert all(c["status"] == "ok" for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    agreement = checks["agreement"]   # the CPU against itself: identical updates and PSNR
    assert agreement["agree"] and agreement["psnr_difference"] == 0 and max(agreement["updates"].values()) == 0
    seed = checks["seed003"]["runs"]["auto"]
    assert seed["iterations_run"] == 3 and any("batched with vmap" in note for note in seed["notes"])
    assert any("output gradient observed" in note for note in seed["notes"]) and seed["options"]["rewind"] is True
    assert checks["resnet18-224"]["iterations_run"] == 2 and len(checks["gradinversion"]["gradinversion"]["psnr"]) == 8
    rows = checks["bench"]["rows"]
    assert [r["name"] for r in rows] == list(module.QUICK_CASES)
    assert [r["iterations_run"] for r in rows] == [2, 2, None] and rows[-1]["psnr"] >= 60   # fc-bias is exact
    # a share of the run: the iterations are cut to what 10 timed iterations say fits in it
    assert fitted["fitted_from"] == 4800 and 1 <= fitted["iterations"] < 4800 and fitted["time_budget"] == 0.5
    assert fitted["iterations"] <= 0.95 * 0.5 / fitted["seconds_per_iteration"] + 1


def _fit_lenet(module) -> dict:
    import torch

    import gradleak as gl
    from gradleak.data import load_builtin
    from gradleak.models import build_model

    model, photo = build_model("lenet", (3, 32, 32), 10), load_builtin("photos", size=32, n=1)
    update = gl.fedsgd_update(model, photo.images, photo.labels)
    return module._fitted("inverting-gradients", {"iterations": 4800}, model, gl.ThreatModel(), update,
                          torch.device("cpu"), 0.5)
