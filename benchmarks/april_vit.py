"""APRIL's closed form on a ViT (32 px photos, 4 px patches: 64 patches, 1 layer): PSNR of the
recovered image at batch 1 in float64 and float32, and what breaks it: the width at or below the
patch count, Gaussian noise on the update, a batch of 2 (the formula applied anyway to the summed
position gradient). Held-out photos 8 and 9 (never used for tuning; a closed form has nothing to tune).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/april_vit.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def main() -> None:
    from gradleak.attacks import AprilInversion
    from gradleak.attacks.april import april_patches
    from gradleak.client import fedsgd_update
    from gradleak.data import load_builtin
    from gradleak.data.spec import DataSpec
    from gradleak.defenses import make_defenses
    from gradleak.defenses.base import ClientContext
    from gradleak.errors import AttackNotApplicable
    from gradleak.metrics import psnr
    from gradleak.models import ModelSpec

    torch.set_num_threads(1)
    photos = load_builtin("photos", size=32)
    print("| setting | photo 8 | photo 9 |\n|---|---|---|")

    def row(label, width=128, dtype="float64", noise=None):
        cells = []
        for k in (8, 9):
            built = ModelSpec("vit", {"width": width, "layers": 1, "heads": 2}, dtype=dtype).build((3, 32, 32), 10)
            image = photos.images[k:k + 1].to(built.dtype)
            spec = DataSpec.from_images(photos.images.to(built.dtype))
            update = fedsgd_update(built.module, image, photos.labels[k:k + 1], spec=spec)
            if noise:
                (defense,) = make_defenses([f"gaussian:variance={noise}"])
                update = defense.apply(update, ClientContext(built.module, image, photos.labels[k:k + 1], spec,
                                                             built.loss, 0), torch.Generator().manual_seed(k))
            try:
                result = AprilInversion(built.module).reconstruct(update)
                cells.append(f"{float(psnr(result.images.clamp(0, 1), image)):.1f} dB")
            except AttackNotApplicable as error:
                cells.append(f"refused ({error.condition})")
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("batch 1, width 128 (64 patches <= d), float64")
    row("batch 1, width 128, float32", dtype="float32")
    row("batch 1, width 64 (64 patches = d), float64", width=64)
    row("batch 1, width 32 (64 patches > d)", width=32)
    for noise in (1e-12, 1e-8, 1e-4):
        row(f"batch 1, width 128, float64, Gaussian noise variance {noise:g}", noise=noise)
    # a batch of 2: the position gradient sums both images' dL/dz; the formula applied anyway
    built = ModelSpec("vit", {"width": 128, "layers": 1, "heads": 2}, dtype="float64").build((3, 32, 32), 10)
    images = photos.images[8:10].double()
    spec = DataSpec.from_images(photos.images.double())
    update = fedsgd_update(built.module, images, photos.labels[8:10], spec=spec)
    patches, rank, residual = april_patches(update.tensors["net.vit.embeddings.position_embeddings"][0, 1:],
                                            update.tensors["net.vit.embeddings.patch_embeddings.projection.weight"])
    mixed = spec.denormalize(patches.reshape(8, 8, 3, 4, 4).permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32))
    print(f"| batch 2 (refused; the formula forced on the summed gradient, residual {residual:.1e}) | "
          f"{float(psnr(mixed.clamp(0, 1), images[:1])):.1f} dB | {float(psnr(mixed.clamp(0, 1), images[1:])):.1f} dB |")


if __name__ == "__main__":
    main()
