"""benchmarks/bench.py, the benchmark runner: its figures are read off the attack's own hooks
(a few iterations here, on built-in photos; the timings themselves are never asserted)."""

from __future__ import annotations

import math

import pytest
from benchmark_support import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench") as module:
        yield module


def test_iterative_case_records_a_timed_curve(bench):
    case = bench.Case("ig-lenet-test", "inverting-gradients", "lenet", quick=12, target_db=0.0)
    row = bench.run_case(case, quick=True, device="cpu", threads=1, start=8)
    assert row["iterations_run"] == 12 and row["images_from"] == 8
    curve = row["curve"]
    assert [p["iteration"] for p in curve] == sorted({p["iteration"] for p in curve}) and len(curve) >= 3
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(curve, curve[1:]))
    assert all(math.isfinite(p["psnr"]) and -1 <= p["ssim"] <= 1 for p in curve)
    assert 0 < row["seconds_per_iteration"] < row["seconds"]
    assert row["seconds_to_target"] == curve[0]["seconds"]  # a 0 dB target is met at the first record
    assert row["peak_memory_mb"] > 0 and "ig-lenet-test" in bench.table([row])


def test_closed_form_case_scores_its_single_result(bench):
    case = next(c for c in bench.CASES if c.name == "fc-bias-mlp-224-b1")
    row = bench.run_case(case, quick=True, device="cpu", threads=1, start=9)
    assert row["psnr"] >= 60 and row["seconds_per_iteration"] is None
    assert row["seconds_to_target"] == row["seconds"] == row["curve"][0]["seconds"]


def test_scaling_tiles_and_per_iteration_median():
    """benchmarks/scaling.py: a batch past 8 photos is k x k tiles of each photo (distinct
    crops that reassemble into the photo); seconds per iteration skip the warm-up."""
    import torch

    from gradleak.data import load_builtin

    with benchmark_module("scaling") as scaling:
        images, labels = scaling.tiles(64, 32)
    assert images.shape == (64, 3, 32, 32) and labels.tolist() == [p % 8 for p in range(64)]
    assert len({tuple(t.flatten()[::97].tolist()) for t in images}) == 64
    photos = load_builtin("photos", size=96, n=8).images      # 64 images: 3 x 3 tiles of 8 photos
    assert torch.equal(images[8 * 4 + 5], photos[5][:, 32:64, 32:64])  # tile (1, 1) of photo 5
    assert scaling.per_iteration([0.0, 1.0, 2.0, 2.5, 3.5, 4.0]) == 0.5
    assert scaling.per_iteration([0.0, 1.0, 2.0]) is None
