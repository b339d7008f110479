"""APRIL's closed form for Vision Transformers (Lu et al., "APRIL: Finding the Achilles' Heel on
Privacy for Vision Transformers", CVPR 2022): the input image from the gradients of the learned
position embedding and of the patch embedding.

A ViT embeds patch p of the image as z_p = W x_p + b (a convolution of stride = kernel = the
patch side) and adds a learned position embedding: e_p = z_p + pos_p. So for one image

    dL/dpos_p = dL/dz_p          and          dL/dW = sum_p dL/dz_p x_p^T = G^T X,

with G (P x d) read off the position-embedding gradient and X (P x C p p) the patches. X is
the least-squares solution of G^T X = dL/dW, exact when G has full column rank P, i.e. at most
d patches (P <= d) that the gradient reaches. Conditions: batch size 1 (a batch sums the
dL/dz of its images into one position gradient), learned position embeddings that are
trained, the patch embedding trained, no noise. Solved in float64 whatever the dtype.
"""

from __future__ import annotations

import math

import torch

from ..errors import AttackNotApplicable
from .base import Attack, Reconstruction, register_attack, require_single_sample

__all__ = ["AprilInversion", "april_patches"]


def april_patches(position_grad: torch.Tensor, weight_grad: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Patches X (P, C*p*p) solving G^T X = dL/dW from the position-embedding gradient's patch
    rows G (P, d) and the patch embedding's weight gradient (d, C, p, p); the rank of G; and the
    relative residual of the solve (0 when exact)."""
    g = position_grad.to(torch.float64)
    w = weight_grad.reshape(weight_grad.shape[0], -1).to(torch.float64)
    solution = torch.linalg.lstsq(g.T, w, driver="gelsd").solution        # (P, C p p)
    rank = int(torch.linalg.matrix_rank(g))
    residual = float((g.T @ solution - w).norm() / w.norm().clamp_min(1e-300))
    return solution, rank, residual


@register_attack
class AprilInversion(Attack):
    """APRIL (Lu et al. 2022): a ViT's input image in closed form from its position-embedding and
    patch-embedding gradients (batch 1, at most d patches)."""

    name = "april"
    paper = "Lu et al., APRIL: Finding the Achilles' Heel on Privacy for Vision Transformers, CVPR 2022"
    conditions = "a ViT (model 'vit') with trained learned position embeddings; batch size 1; patches <= width d"

    def _reconstruct(self, update):
        require_single_sample(update, "APRIL")
        net = getattr(self.model, "net", None)
        embeddings = getattr(getattr(net, "vit", None), "embeddings", None)
        if embeddings is None:
            raise AttackNotApplicable(f"{type(self.model).__name__} is not a ViT (model 'vit')", condition="a ViT")
        gradient = update.as_gradient()
        pos_name, w_name = "net.vit.embeddings.position_embeddings", "net.vit.embeddings.patch_embeddings.projection.weight"
        if pos_name not in gradient or w_name not in gradient:
            raise AttackNotApplicable("the update holds no gradient of the position or patch embedding (frozen?)",
                                      condition="learned position embeddings and patch embedding trained")
        weight = gradient[w_name]
        width, channels, patch = weight.shape[0], weight.shape[1], weight.shape[2]
        rows = gradient[pos_name][0, 1:]                                   # patch rows; row 0 is the class token
        count = rows.shape[0]
        if count > width:
            raise AttackNotApplicable(f"{count} patches > width d = {width}: G^T X = dL/dW is underdetermined",
                                      condition=f"patches <= d ({width})")
        patches, rank, residual = april_patches(rows, weight)
        side = int(math.isqrt(count))
        image = patches.reshape(side, side, channels, patch, patch).permute(2, 0, 3, 1, 4).reshape(
            1, channels, side * patch, side * patch)
        spec = update.data_spec
        image = spec.denormalize(image.to(weight.dtype)) if spec is not None else image.to(weight.dtype)
        notes = [f"{count} patches of {channels}x{patch}x{patch} from the position-embedding gradient (rank {rank} of "
                 f"{count}), residual {residual:.1e}" + ("" if rank == count else " (APPROXIMATE: rank deficient)")]
        return Reconstruction(images=image.detach(), notes=notes, history={"rank": [float(rank)]})
