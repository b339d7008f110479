"""Metrics: matching before scoring, multiset label accuracy, PSNR/SSIM conventions, LPIPS offline."""

from __future__ import annotations

import math

import pytest
import torch

from gradleak.metrics import label_accuracy, lpips, lpips_status, match, mse, psnr, score, ssim


def test_matching_undoes_an_unknown_batch_order(photos):
    originals = photos.images[:6]
    order = torch.tensor([3, 5, 0, 1, 4, 2])
    noisy = (originals[order] + 0.03 * torch.sin(torch.arange(3 * 32 * 32).reshape(3, 32, 32))).clamp(0, 1)
    perm = match(noisy, originals)
    assert torch.equal(order[perm], torch.arange(6))
    scores = score(noisy, originals)
    assert [row["matched_to"] for row in scores.per_image] == perm.tolist()
    # Scoring in the given (wrong) order would be far worse than after matching.
    assert float(psnr(noisy, originals).mean()) < scores.summary["psnr_mean"] - 5


def test_fewer_reconstructions_than_originals_leave_some_unmatched(photos):
    perm = match(photos.images[[4, 1]], photos.images[:5])
    assert sorted(perm.tolist()) == [-1, -1, -1, 0, 1] and perm[4] == 0 and perm[1] == 1


def test_every_original_is_scored_recovered_or_not(photos):
    """An attack that recovers 2 of 5 images: 5 rows, 3 of them 'not recovered'; the counts say so
    and the means are over the 2 (the mean no longer hides the lost images)."""
    originals = photos.images[:5]
    noisy = (originals[[4, 1]] + 0.2 * (originals[[0, 0]] - 0.5)).clamp(0, 1)   # one close, one less so
    recovered = torch.cat([originals[[2]], noisy])                               # image 2 exactly, 4 and 1 roughly
    scores = score(recovered, originals)
    rows = {row["index"]: row for row in scores.per_image}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert [rows[i]["recovered"] for i in range(5)] == [False, True, True, False, True]
    assert rows[0]["psnr"] is None and rows[0]["matched_to"] is None and math.isinf(rows[2]["psnr"])
    s = scores.summary
    assert (s["n_images"], s["n_recovered"], s["n_exact"]) == (5, 3, 1)
    finite = [rows[i]["psnr"] for i in (1, 4)]
    assert s["psnr_mean"] == math.inf and all(20 < p < 60 for p in finite)
    from gradleak.metrics import recovery_counts

    assert recovery_counts(s) == "3 of 5 images recovered (1 exact, >= 60 dB)"


def test_psnr_matches_its_definition_and_is_infinite_for_identical_images(photos):
    a = photos.images[:2].double()
    b = (a + 0.01).clamp(0, 1)
    expected = 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(psnr(b, a), expected)
    assert math.isinf(float(psnr(a, a)[0]))
    torch.testing.assert_close(mse(b, a), ((a - b) ** 2).flatten(1).mean(1))


def test_reconstructions_are_clamped_before_scoring(photos):
    a = photos.images[:1]
    out_of_range = torch.where(a > 0.5, torch.full_like(a, 7.0), a)
    assert float(psnr(out_of_range, a)[0]) == pytest.approx(float(psnr(out_of_range.clamp(0, 1), a)[0]))
    assert float(psnr(out_of_range, a)[0]) > float(10 * torch.log10(1 / ((out_of_range - a) ** 2).mean()))
    assert float(mse(a - 1.0, torch.zeros_like(a))[0]) == 0.0  # everything below 0 clamps to 0


def test_ssim_ranks_a_blurred_photo_below_the_original_and_handles_tiny_digits(photos, digits):
    a = photos.images[:3]
    blurred = torch.nn.functional.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)
    values = ssim(blurred, a)
    assert torch.all(values < 0.98) and torch.all(values > 0.2)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    small = ssim(digits.images[:4], digits.images[:4])  # 8x8: window shrinks to 7
    assert torch.allclose(small, torch.ones(4), atol=1e-5)


def test_label_accuracy_is_a_multiset_overlap():
    assert label_accuracy(torch.tensor([2, 2, 7]), torch.tensor([7, 2, 2])) == 1.0
    assert label_accuracy(torch.tensor([2, 2, 2]), torch.tensor([7, 2, 2])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([1]), torch.tensor([0])) == 0.0


def test_lpips_is_unavailable_offline_and_never_downloads(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    available, reason = lpips_status()
    assert not available and str(tmp_path) in reason
    assert lpips(photos.images[:1], photos.images[:1]) is None
    scores = score(photos.images[:2], photos.images[:2])
    assert scores.lpips == {"available": False, "reason": reason} and scores.summary["lpips_mean"] is None


@pytest.mark.slow
def test_lpips_runs_when_backbone_weights_are_on_disk(photos, tmp_path, monkeypatch):
    import torchvision

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    torch.manual_seed(0)  # stand-in weights: the test checks the offline code path, not LPIPS' calibration
    torch.save(torchvision.models.alexnet().state_dict(), checkpoints / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert lpips_status()[0]
    a = photos.images[:2]
    same, other = lpips(a, a), lpips(a, photos.images[2:4])
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert torch.all(other > same)
