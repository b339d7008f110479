"""Defenses against gradient leakage, composable, each a transform at one stage of FL.

=========================  ==========  =================================================
name                       stage       what it does
=========================  ==========  =================================================
``gaussian``               update      add N(0, variance) (DLG §5)
``laplacian``              update      add Laplace noise of a given variance (DLG §5)
``clipping``               update      clip the update's global L2 norm
``pruning``                update      zero the smallest-magnitude entries (DLG §5)
``random-mask``            update      zero a random fraction of entries
``half``                   update      float16 / bfloat16 transport (DLG §5)
``int8``                   update      symmetric 8-bit quantisation per tensor
``sign``                   update      signSGD, scaled by the mean magnitude
``soteria``                update      prune the representation's gradient (Sun et al. 2021)
``dp-sgd``                 client      DP-SGD through Opacus, calibrated to (epsilon, delta)
``per-example-clipping``   client      DP-SGD's clipping alone, through Opacus
``local-steps``            client      FedAvg: K local SGD steps, share the delta
``secure-aggregation``     aggregate   the server sees only the sum of N clients
=========================  ==========  =================================================

Larger batches are the ``batch_size`` of :class:`~gradleak.client.ClientSetup`.
"""

from .base import (DEFENSES, STAGES, ClientContext, Defense, PrivateTraining, get_defense, make_defense,  # noqa: F401
                   make_defenses, register_defense, stack_label)
from .compression import HalfPrecision, Int8Quantization, Pruning, RandomMask, SignCompression  # noqa: F401
from .dp import DPSGD, PerExampleClipping, calibrate_noise, epsilon_spent  # noqa: F401
from .inspection import ClientRefused, ModelInspection, inspect_model  # noqa: F401
from .perturbation import GaussianNoise, LaplacianNoise, UpdateClipping  # noqa: F401
from .protocol import LocalTraining, SecureAggregation  # noqa: F401
from .freeze import Freeze  # noqa: F401
from .soteria import Soteria, soteria_scores  # noqa: F401
from .stack import DefendedUpdate, aggregate_updates, defend_client, defended_updates  # noqa: F401

__all__ = [
    "DEFENSES", "STAGES", "Defense", "ClientContext", "PrivateTraining", "get_defense", "make_defense", "make_defenses",
    "stack_label",
    "register_defense", "GaussianNoise", "LaplacianNoise", "UpdateClipping", "Pruning", "RandomMask", "HalfPrecision",
    "Int8Quantization", "SignCompression", "DPSGD", "PerExampleClipping", "LocalTraining", "SecureAggregation",
    "Soteria", "soteria_scores", "calibrate_noise", "epsilon_spent", "DefendedUpdate", "defended_updates",
    "defend_client", "aggregate_updates", "ModelInspection", "inspect_model", "ClientRefused",
]
