"""How good a reconstruction is: MSE, PSNR, SSIM, LPIPS and label accuracy.

Conventions (DESIGN.md): images are compared on the [0, 1] scale (reconstructions are
clamped), data range 1. The attacker does not know the batch order, so reconstructions
are matched to the true images first (Hungarian matching on MSE, :func:`match`), and
label accuracy compares multisets (:func:`label_accuracy`). Each metric has a
functional, per-image form; :func:`score` computes them all and returns :class:`Scores`.

PSNR and SSIM are torchmetrics'. LPIPS (Zhang et al. 2018) is torchmetrics' too, and is
computed only when its backbone weights are already on disk: it is reported as
unavailable otherwise, never downloaded.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import ConfigError

__all__ = ["mse", "psnr", "ssim", "lpips", "lpips_status", "match", "label_accuracy", "score", "Scores",
           "EXACT_PSNR", "recovery_counts"]

EXACT_PSNR = 60.0   # dB: a reconstruction this close is the image (float32 closed forms reach 80-160 dB)
_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim != 4 or a.shape != b.shape:
        raise ConfigError(f"metrics need two NCHW batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).clamp(0, 1), b.to(dtype).clamp(0, 1)


def mse(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, (N,)."""
    a, b = _pair(reconstructed, original)
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, data range 1, (N,); ``inf`` where the images are identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair(reconstructed, original)
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, or the largest odd size that fits small images), (N,)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(reconstructed, original)
    side = min(a.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        return torch.full((a.shape[0],), float("nan"), dtype=a.dtype)
    sigma = 1.5 * kernel / 11
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", kernel_size=kernel, sigma=sigma)


def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """Whether LPIPS can run offline, and why not. Looks for the backbone's weights in the
    torch hub cache and torchmetrics' linear heads; never downloads."""
    if net not in _LPIPS_BACKBONES:
        return False, f"unknown LPIPS backbone {net!r}; choose one of {sorted(_LPIPS_BACKBONES)}"
    try:
        import torchmetrics
        import torchvision.models as tvm
    except Exception as error:  # pragma: no cover - depends on the install
        return False, f"torchvision/torchmetrics do not import ({error})"
    url = getattr(tvm, _LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    weights = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not weights.is_file():
        return False, (f"not computed: LPIPS needs the {net} network's ImageNet weights, which gradleak never "
                       f"downloads; to enable it, fetch {url} and put it at {weights}")
    head = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / f"{net}.pth"
    if not head.is_file():
        return False, f"torchmetrics' LPIPS head {head} is missing"
    return True, f"{net} backbone at {weights}"


def lpips(reconstructed: torch.Tensor, original: torch.Tensor, net: str = "alex") -> torch.Tensor | None:
    """Per-image LPIPS, (N,), or None when the weights are not available locally."""
    available, _ = lpips_status(net)
    if not available:
        return None
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    a, b = _pair(reconstructed, original)
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    values = [learned_perceptual_image_patch_similarity(a[i : i + 1].float(), b[i : i + 1].float(), net_type=net,
                                                        normalize=True) for i in range(a.shape[0])]
    return torch.stack([v.reshape(()) for v in values])


def match(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Hungarian matching on MSE: ``perm[i]`` is the reconstruction matched to original ``i``.

    With fewer reconstructions than originals, unmatched originals get -1.
    """
    if reconstructed.ndim != 4 or original.ndim != 4 or reconstructed.shape[1:] != original.shape[1:]:
        raise ConfigError(f"cannot match reconstructions {tuple(reconstructed.shape)} to originals {tuple(original.shape)}")
    a = reconstructed.detach().double().clamp(0, 1).flatten(1)
    b = original.detach().double().clamp(0, 1).flatten(1)
    cost = torch.cdist(b, a).pow(2).cpu().numpy()
    cost[~np.isfinite(cost)] = np.finfo(np.float64).max / (4 * max(cost.shape))  # a diverged (NaN) image matches last
    rows, cols = linear_sum_assignment(cost)
    perm = torch.full((original.shape[0],), -1, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap: the fraction of true labels recovered, counts included, order ignored."""
    if true.numel() == 0:
        raise ConfigError("label_accuracy: no true labels")
    overlap = Counter(predicted.reshape(-1).tolist()) & Counter(true.reshape(-1).tolist())
    return sum(overlap.values()) / true.numel()


@dataclass
class Scores:
    """Per-image metrics after matching, their summary, and what could not be computed."""

    per_image: list[dict[str, Any]]
    summary: dict[str, Any]
    lpips: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_image": self.per_image, "lpips": self.lpips}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None, None
    if any(math.isinf(v) for v in finite):
        return (float("inf") if all(v > 0 for v in finite if math.isinf(v)) else float("nan")), None
    t = torch.tensor(finite, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def recovery_counts(summary: dict[str, Any]) -> str:
    """``"26 of 32 images recovered (21 exact, >= 60 dB)"``: what the means are over, in words."""
    n, got, exact = summary.get("n_images"), summary.get("n_recovered"), summary.get("n_exact")
    if n is None or got is None:
        return ""
    text = f"{got} of {n} images recovered" if got != n else f"all {n} images recovered"
    return text + (f" ({exact} exact, >= {EXACT_PSNR:.0f} dB)" if exact is not None else "")


def score(reconstructed: torch.Tensor | None, original: torch.Tensor, *, predicted_labels: torch.Tensor | None = None,
          true_labels: torch.Tensor | None = None, use_lpips: bool = True) -> Scores:
    """Match, then score every original against its reconstruction. Every original has a row of
    ``per_image``; one that no reconstruction matched (an attack that recovered fewer images
    than the batch) has ``recovered: false`` and no values, and the summary counts it:
    ``n_images``, ``n_recovered``, ``n_exact`` (PSNR >= :data:`EXACT_PSNR`); the means are over
    the recovered images."""
    summary: dict[str, Any] = {"n_images": int(original.shape[0])}
    per_image: list[dict[str, Any]] = []
    available, reason = lpips_status() if use_lpips else (False, "not requested")
    if reconstructed is not None:
        perm = match(reconstructed, original)
        matched = perm >= 0
        idx = torch.nonzero(matched).reshape(-1)
        rec, orig = reconstructed[perm[idx]], original[idx]
        values = {"mse": mse(rec, orig), "psnr": psnr(rec, orig), "ssim": ssim(rec, orig)}
        lp = lpips(rec, orig) if available else None
        if lp is None and available:
            available, reason = False, "LPIPS failed on these images"
        scored = {i: k for k, i in enumerate(idx.tolist())}
        for i in range(int(original.shape[0])):  # every original, recovered or not
            k = scored.get(i)
            row: dict[str, Any] = {"index": i, "matched_to": None if k is None else int(perm[i]),
                                   "recovered": k is not None}
            row.update({name: None if k is None else float(v[k]) for name, v in values.items()})
            row["lpips"] = None if lp is None or k is None else float(lp[k])
            per_image.append(row)
        for name in ("psnr", "ssim", "mse", "lpips"):
            mean, std = _mean_std([r[name] for r in per_image if r[name] is not None])
            summary[f"{name}_mean"], summary[f"{name}_std"] = mean, std
    recovered = [r for r in per_image if r.get("recovered")]
    summary["n_recovered"] = len(recovered)
    summary["n_exact"] = sum(1 for r in recovered if r["psnr"] is not None and r["psnr"] >= EXACT_PSNR)
    summary["label_accuracy"] = (
        label_accuracy(predicted_labels, true_labels)
        if predicted_labels is not None and true_labels is not None else None
    )
    return Scores(per_image=per_image, summary=summary, lpips={"available": available, "reason": reason})
