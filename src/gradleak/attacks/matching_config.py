"""Every choice of a gradient-matching attack: :class:`MatchingConfig` (defaults: Inverting
Gradients), validated when built so that a bad option is refused in one line naming it. The
engine that runs a configuration is :mod:`.optimization`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..limits import (
    MAX_ITERATIONS,
    MAX_RESTARTS,
    check_batch,
    check_bool,
    check_float,
    check_int,
    check_seed,
    short_repr,
)
from .matching import LAYER_WEIGHTS, OBJECTIVES

__all__ = ["MatchingConfig"]

_CHOICES = {
    "objective": OBJECTIVES, "layer_weights": LAYER_WEIGHTS, "optimizer": ("adam", "lbfgs", "sgd"),
    "signed": (None, "sign", "tanh"), "schedule": ("none", "step", "cosine", "exponential"), "init": ("randn", "rand", "zeros", "flat", "randn+flat"),
    "labels": ("given", "infer", "distinct", "optimize", "separated"), "group_schedule": ("constant", "linear"), "batched_restarts": ("auto", "vmap", "loop"),
    "batched_targets": ("auto", "loop"),
    "line_search": (None, "strong_wolfe"), "output_gradient": ("model", "observed", "auto", "separated"),
    "mixture": ("mean", "fitted"),
}


_COUNT_LIMITS = {"iterations": MAX_ITERATIONS, "restarts": MAX_RESTARTS, "lbfgs_history": 10_000,
                 "lbfgs_inner": 10_000, "record_every": MAX_ITERATIONS}


@dataclass(frozen=True)
class MatchingConfig:
    """Every choice of a gradient-matching attack (defaults: Inverting Gradients)."""

    objective: str = "cosine"
    layers: str | tuple[str, ...] = "all"
    layer_weights: str = "equal"
    tv: float = 0.0              # total variation weight
    l2: float = 0.0              # squared-norm prior weight
    bn: float = 0.0              # BatchNorm-statistics prior weight (needs ThreatModel(bn_statistics=True))
    group: float = 0.0           # group-consistency weight (Yin et al. 2021): restarts pulled to their mean
    group_start: float = 0.0     # fraction of the iterations before the group term turns on
    group_schedule: str = "constant"  # constant | linear (ramps from 0 at group_start to group at the end)
    optimizer: str = "adam"
    lr: float = 0.1
    signed: str | None = "sign"  # Adam/SGD on sign(grad) or tanh(grad / mean|grad|)
    precondition: float = 0.0    # spectral preconditioning: the image gradient's spatial spectrum x |f|^(-2a)
                                 # before the (signed) step; 0 = none, 0.5 = what helps trained networks (_steps.py)
    smooth_relu: float = 0.0    # > 0: a first pass through softplus(beta = this) for every ReLU, then a second pass
                                 # through the exact model at lr/10 from its result (2x the iterations; _continuation.py)
    boxed: bool = True           # project onto the valid pixel range after each step
    schedule: str = "step"       # step decay x0.1 at 3/8, 5/8, 7/8 of the iterations, cosine, or exponential
                                 # (x0.01 over the run, LAMP's x0.89 every 50 of 2,000)
    rewind: bool = False         # at each decay of the step schedule, go back to each restart's best iterate so far
                                 # (the optimiser's moments cleared): trained networks' losses rise at lr 0.1 (_engine.py)
    iterations: int = 4800
    init: str = "randn"          # randn | rand | zeros | flat (the uniform image of lowest matching loss) |
                                 # randn+flat (restarts - 1 random starts and one flat one; _flat_start.py)
    restarts: int = 1
    screen: int | None = None    # restarts > 1: each runs this many iterations; the lowest matching loss runs to the end
    labels: str = "infer"        # given (threat model) | infer (counts) | distinct (Yin et al.) | optimize | separated
                                 # (optimize: DLG's; separated: found with the output gradients, _output_separation.py)
    output_gradient: str = "model"  # dL/d(output) of the candidate: its own (model) | the classifier bias gradient
                                    # of a batch-1 gradient (observed) | observed where valid (auto); matching.py |
                                    # each image's own, separated out of the classifier gradient (separated;
                                    # _output_separation.py): batches of B < C images
    features: float = 0.0        # output_gradient="separated": weight of each candidate's cosine distance to its
                                 # image's separated classifier features (scale-free per image; _separated.py)
    batch_size: int | None = None  # needed only when the threat model hides the batch size
    carried: int | None = None   # reconstruct only this many of the batch's images: those that carry the update
                                 # (gradleak.shares; 1 with output_gradient="observed" on a trained network's batch)
    mixture: str = "mean"        # the candidates' gradients enter as the client's mean (mean) or with nonnegative
                                 # weights fitted to the update at every evaluation (fitted; _mixture.py): batches
                                 # of a trained network, whose update one image dominates
    lbfgs_history: int = 100
    lbfgs_inner: int = 20
    line_search: str | None = "strong_wolfe"  # L-BFGS line search; None = fixed step lr (DLG's code)
    tol: float | None = None     # stop once the matching loss is below this
    patience: int | None = None  # stop after this many iterations without improvement
    time_budget: float | None = None  # stop after this many seconds (per group of restarts)
    record_every: int = 10
    batched_restarts: str = "auto"
    batched_targets: str = "auto"  # several updates at once (reconstruct_many): auto = where vmap can | loop
    compile: bool = False        # torch.compile the matching step (pays on conv nets over long runs, after a cold compile)
    seed: int = 0

    def __post_init__(self):
        for name in ("signed", "line_search"):
            if getattr(self, name) in ("none", "false", False):
                object.__setattr__(self, name, None)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if not isinstance(value, (str, type(None))) or value not in choices:
                raise ConfigError(f"{field} must be one of {choices}, got {short_repr(value)}")
        for field, high in _COUNT_LIMITS.items():
            check_int(field, getattr(self, field), 1, high)
        for field in ("tv", "l2", "bn", "group"):
            check_float(field, getattr(self, field))
        check_float("group_start", self.group_start)
        if self.group_start >= 1:
            raise ConfigError(f"group_start must be a fraction of the iterations in [0, 1), got {short_repr(self.group_start)}")
        if self.mixture == "fitted" and self.output_gradient == "separated":
            raise ConfigError("mixture='fitted' with output_gradient='separated': the separated output gradients fix "
                              "each image's part of the update already; choose one")
        if self.output_gradient == "separated" and self.labels == "optimize":
            raise ConfigError("output_gradient='separated' finds the labels with the output gradients; "
                              "labels='optimize' has none to give it (use labels='infer' or 'given')")
        check_float("features", self.features)
        if self.features > 0 and self.output_gradient != "separated":
            raise ConfigError(f"features={self.features:g} needs output_gradient='separated' (the features are "
                              f"separated out of the classifier gradient), got output_gradient={self.output_gradient!r}")
        if self.group > 0 and self.restarts < 2:
            raise ConfigError(f"group={self.group:g} needs restarts >= 2 (the group's consensus is their mean), "
                              f"got restarts={self.restarts}")
        check_float("lr", self.lr, low_open=True)
        check_float("precondition", self.precondition)
        if self.precondition > 2:
            raise ConfigError(f"precondition is the exponent a of |f|^(-2a), in [0, 2], got {short_repr(self.precondition)}")
        if self.precondition and self.optimizer == "lbfgs":
            raise ConfigError(f"precondition={self.precondition:g} shapes a first-order step: it needs optimizer adam or "
                              "sgd, got lbfgs")
        if self.init == "flat" and self.restarts > 1:
            raise ConfigError(f"init='flat' starts every restart at the same image: use restarts=1 or init='randn+flat', "
                              f"got restarts={self.restarts}")
        if self.init == "randn+flat" and self.restarts < 2:
            raise ConfigError(f"init='randn+flat' runs random starts and one flat start: it needs restarts >= 2, "
                              f"got restarts={self.restarts}")
        check_float("smooth_relu", self.smooth_relu)
        if self.smooth_relu and self.labels == "optimize":
            raise ConfigError(f"smooth_relu={self.smooth_relu:g}'s exact pass restarts from the smooth pass's images, not its "
                              "soft labels: use labels='given', 'infer' or 'distinct'")
        check_float("tol", self.tol, optional=True)
        check_float("time_budget", self.time_budget, low_open=True, optional=True)
        if self.patience is not None:
            check_int("patience", self.patience, 1, MAX_ITERATIONS)
        if self.screen is not None:
            check_int("screen", self.screen, 1, self.iterations - 1 if self.iterations > 1 else 1)
            if self.restarts < 2 or self.group > 0:
                raise ConfigError(f"screen={self.screen} picks one of several independent restarts: it needs restarts >= 2"
                                  f" and group=0, got restarts={self.restarts}, group={self.group:g}")
        if self.batch_size is not None:
            check_batch("batch_size", self.batch_size, None)
        if self.carried is not None:
            check_batch("carried", self.carried, None)
        if self.mixture == "fitted" and (self.compile or self.batched_restarts == "vmap"):
            raise ConfigError("mixture='fitted' fits its weights with plain autograd outside torch.func transforms: "
                              "it cannot run with compile=True or batched_restarts='vmap'")
        check_seed("seed", self.seed)
        check_bool("boxed", self.boxed)
        check_bool("compile", self.compile)
        check_bool("rewind", self.rewind)
        if self.rewind and (self.schedule != "step" or self.optimizer == "lbfgs"):
            raise ConfigError(f"rewind=True goes back to the best iterate at each decay of a first-order step schedule: it "
                              f"needs schedule='step' and optimizer adam or sgd, got schedule={self.schedule!r}, "
                              f"optimizer={self.optimizer!r}")
        layers = self.layers
        if not (isinstance(layers, str) and len(layers) <= 200 or isinstance(layers, tuple) and len(layers) <= 10_000
                and all(isinstance(name, str) for name in layers)):
            raise ConfigError(f"layers must be 'all', 'first:k', 'last:k', 'largest:k' or a list of parameter names, "
                              f"got {short_repr(layers)}")

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
