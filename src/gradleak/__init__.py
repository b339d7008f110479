"""gradleak: how much private training data leaks from federated-learning updates.

The public API, in the order data flows through it::

    images, labels (data)  ->  fedsgd_update / fedavg_update (client)  ->  SharedUpdate
    SharedUpdate + model + ThreatModel  ->  attack.reconstruct  ->  Reconstruction
    Reconstruction + ground truth  ->  score  ->  write_run (pictures and an HTML report)
"""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .attacks import (  # noqa: E402
    ATTACKS, DLG, IDLG, Attack, FCBiasInversion, FedAvgInversion, GradientMatching, InvertingGradients,
    MatchingConfig, Reconstruction, fc_bias_inversion, get_attack,
)
from .client import ClientSetup, fedavg_update, fedsgd_update  # noqa: E402
from .data.spec import DataSpec  # noqa: E402
from .errors import AttackNotApplicable, ConfigError, DataError, GradleakError, UpdateFileError  # noqa: E402
from .models import ModelSpec, build_model  # noqa: E402
from .threat import SOK_THREAT_MODELS, ThreatModel, sok_threat_model  # noqa: E402
from .update import SharedUpdate  # noqa: E402
from .update_file import load_update, save_update  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ATTACKS", "Attack", "FCBiasInversion", "Reconstruction", "fc_bias_inversion", "get_attack",
    "GradientMatching", "MatchingConfig", "DLG", "IDLG", "InvertingGradients", "FedAvgInversion",
    "fedavg_update", "fedsgd_update", "ClientSetup", "DataSpec", "build_model", "ModelSpec", "ThreatModel", "SOK_THREAT_MODELS", "sok_threat_model",
    "SharedUpdate", "load_update", "save_update",
    "AttackNotApplicable", "ConfigError", "DataError", "GradleakError", "UpdateFileError",
]
