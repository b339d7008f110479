"""Attacks, one module per family, each registered by name in :data:`ATTACKS`.

- :mod:`.analytic`: closed-form inversion of a fully connected layer with bias (``fc-bias``).
- :mod:`.labels`: label recovery from the classifier gradient.
"""

from .analytic import FCBiasInversion, FCInversion, fc_bias_inversion
from .base import ATTACKS, Attack, Reconstruction, get_attack, register_attack
from .labels import idlg_label

__all__ = [
    "ATTACKS", "Attack", "Reconstruction", "get_attack", "register_attack",
    "FCBiasInversion", "FCInversion", "fc_bias_inversion", "idlg_label",
]
