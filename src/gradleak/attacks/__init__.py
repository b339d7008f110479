"""Attacks, one module per family, each registered by name in :data:`ATTACKS`.

- :mod:`.analytic`: closed-form inversion of a fully connected layer with bias (``fc-bias``).
- :mod:`.optimization`: the gradient-matching engine (``gradient-matching``) and its presets
  ``dlg``, ``idlg``, ``inverting-gradients``, ``fedavg``; pieces in :mod:`.matching`.
- :mod:`.gradinversion`: GradInversion (``gradinversion``, Yin et al. 2021), a preset of the engine
  with batch labels, the BatchNorm-statistics prior and group consistency over restarts.
- :mod:`.labels`: label recovery from the classifier gradient (iDLG; counts for batches).
- :mod:`._output_separation`: each image's output gradient, classifier features and label, separated
  out of a batch's classifier gradient (``separate_output_gradients``; the engine's ``output_gradient="separated"``).
- :mod:`.qian`, :mod:`.rgap`, :mod:`.copa`: closed-form and layer-wise attacks (``qian``, ``rgap``, ``copa``).
- :mod:`.malicious`: a malicious server that changes the model it sends (``imprint``, Robbing the Fed).
- :mod:`.dager`: text, the exact span attack on transformers (``dager``, Petrov et al. 2024).
- :mod:`.text_tokens`: text, the bag of words from the embedding gradient (``bag-of-words``).
- :mod:`.text_matching`: text, gradient matching on token embeddings (``tag``, ``lamp``) through the engine.
- :mod:`.april`: APRIL's closed form for Vision Transformers (``april``).
- :mod:`.decepticons`: text, a malicious server corrupting a transformer's parameters (``decepticons``, Fowl et al. 2022).
"""

from .analytic import FCBiasInversion, FCInversion, fc_bias_inversion
from .base import ATTACKS, Attack, Reconstruction, get_attack, register_attack
from .labels import count_labels, distinct_labels, idlg_label
from ._output_separation import OutputSeparation, separate_output_gradients
from .optimization import DLG, IDLG, FedAvgInversion, GradientMatching, InvertingGradients, MatchingConfig
from .gradinversion import GradInversion
from .copa import COPA, copa_layer, copa_security
from .qian import QianInversion, qian_batch_inversion, qian_cnn_condition
from .rgap import RGAP, rank_analysis, rgap_last_layer, rgap_layer
from .dager import SpanAttack
from .text_tokens import BagOfWords
from .text_matching import LAMP, TAG
from .april import AprilInversion
from .malicious import ClassFishing, ImprintAttack, ImprintedModel, MaliciousAttack, TrapWeights, imprint_cuts, imprint_inversion
from .decepticons import Decepticons

__all__ = [
    "ATTACKS", "Attack", "Reconstruction", "get_attack", "register_attack",
    "FCBiasInversion", "FCInversion", "fc_bias_inversion", "idlg_label", "count_labels", "distinct_labels",
    "OutputSeparation", "separate_output_gradients",
    "GradientMatching", "MatchingConfig", "DLG", "IDLG", "InvertingGradients", "FedAvgInversion", "GradInversion",
    "QianInversion", "qian_batch_inversion", "qian_cnn_condition", "RGAP", "rank_analysis", "rgap_last_layer",
    "rgap_layer", "COPA", "copa_layer", "copa_security",
    "SpanAttack", "BagOfWords", "TAG", "LAMP", "AprilInversion", "MaliciousAttack", "ImprintAttack", "ImprintedModel", "imprint_cuts", "imprint_inversion", "TrapWeights", "ClassFishing", "Decepticons",
]
