"""GradInversion (Yin et al. 2021): batch recovery through train-mode BatchNorm, as a preset
of the one gradient-matching engine (:mod:`.optimization`).

Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov 2021, "See through Gradients: Image Batch
Recovery via GradInversion" (CVPR). Three additions to gradient matching make large
batches recoverable from one gradient of a BatchNorm network:

1. batch label recovery from the classifier gradient, before any optimisation (their rule,
   :func:`~gradleak.attacks.labels.distinct_labels`, for non-repeating labels; here by
   default the counting rule :func:`~gradleak.attacks.labels.count_labels`, which agrees
   with it on distinct labels and also handles repeats);
2. the BatchNorm-statistics prior :class:`~gradleak.attacks.matching.BatchNormStatistics`:
   the candidate batch's per-layer means and variances must equal the client's. Yin et al.
   use a trained network's running statistics as a proxy; here the attacker is granted the
   client's running statistics after its step (``ThreatModel(bn_statistics=True)``) and
   recovers the client's own batch statistics exactly from them and the momentum (for an
   eval-mode client the buffers do not move, and the prior falls back to the running
   statistics, as in the paper);
3. group consistency: several restarts ("seeds") optimised in lockstep, each pulled towards
   the group's consensus (:func:`~gradleak.attacks.matching.group_consistency`). Yin et al.
   register the restarts onto each other (RANSAC-flow) before averaging; here the consensus
   is the plain pixel-wise mean, which needs the restarts to agree on the order of the
   batch: recovered labels fix each slot's class, so distinct labels tie every slot to one
   image and the mean is meaningful, while slots that share a label may swap between
   restarts.

The result is the candidate with the lowest matching loss among the restarts' best
iterates and their consensus: the attacker has no ground truth, and the matching loss
is what it can check. Plus total-variation and L2 image priors, Adam on the sign of the
input gradient, the box constraint and step decay (as Inverting Gradients); the matching
distance is Inverting Gradients' cosine (Yin et al. use an L2 distance), so that the
comparison with ``inverting-gradients`` isolates what the three additions buy.

Conditions: a model with BatchNorm layers (the prior is the point); the client's BatchNorm
buffers granted; batch size known; cross-entropy classifier with non-negative penultimate
features for label recovery (or labels granted).
"""

from __future__ import annotations

from ..errors import AttackNotApplicable
from ..functional import has_batch_norm
from ..update import SharedUpdate
from .base import Reconstruction, register_attack
from .optimization import GradientMatching, MatchingConfig

__all__ = ["GradInversion"]


@register_attack
class GradInversion(GradientMatching):
    """GradInversion (Yin et al. 2021): batch label recovery, the BatchNorm-statistics prior
    from the client's batch statistics, group consistency over 4 restarts, TV and L2 priors;
    Inverting Gradients' cosine matching and optimiser. Refuses without BatchNorm statistics."""

    name = "gradinversion"
    paper = ("Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov 2021, See through Gradients: Image Batch Recovery "
             "via GradInversion (CVPR)")
    conditions = ("BatchNorm model with the client's BatchNorm statistics granted (ThreatModel(bn_statistics=True)); "
                  "batch size known; labels given or recoverable from the classifier gradient")
    preset = MatchingConfig(tv=1e-2, l2=1e-4, bn=1e-1, group=1.0, restarts=4)

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        if not has_batch_norm(self.model):
            raise AttackNotApplicable("gradinversion's prior is the BatchNorm statistics, and the model has no "
                                      "BatchNorm layer (use inverting-gradients)", condition="a model with BatchNorm")
        if update.buffers is None:
            raise AttackNotApplicable("gradinversion needs the client's BatchNorm statistics, which this threat model "
                                      "does not grant", condition="ThreatModel(bn_statistics=True) and an update "
                                      "with buffers")
        if self.config.bn <= 0:
            raise AttackNotApplicable("gradinversion with bn=0 is Inverting Gradients with restarts: give bn > 0",
                                      condition="bn > 0")
        return super()._reconstruct(update)
