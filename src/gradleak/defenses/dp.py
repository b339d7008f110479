"""Differential privacy on the client: DP-SGD and per-example clipping, through Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips every
example's gradient to norm C, sums, adds Gaussian noise of std sigma*C and divides by the
expected batch size. Opacus does all of it here: ``GradSampleModule`` computes the
per-example gradients, ``DPOptimizer`` clips and noises them, and the noise multiplier
sigma is calibrated to (epsilon, delta) with Opacus's accountant
(``get_noise_multiplier``); the epsilon actually spent is read back from an Opacus
accountant (RDP by default). gradleak writes no accountant of its own.

The client samples each local step's batch by Poisson sampling with rate q = b / n
(b the local batch size, n its data), as the accountant assumes; a FedSGD client uses
its whole batch (q = 1) for its one step. ``rounds`` is how many rounds the budget
covers: sigma is calibrated for rounds x local steps, and each result reports both the
epsilon of the whole budget and the epsilon this one update spends.

Conditions: Opacus needs per-example gradients, so BatchNorm layers are refused (use
GroupNorm or ``batch_norm=false``); the loss is summed per example.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..client import ClientSetup, model_state, shared_metadata
from ..data.spec import DataSpec
from ..errors import ConfigError
from ..losses import get_loss
from ..update import SharedUpdate
from .base import Defense, PrivateTraining, count, one_of, positive, register_defense

__all__ = ["DPSGD", "PerExampleClipping", "private_client_update", "calibrate_noise", "epsilon_spent"]

_ACCOUNTANTS = ("rdp", "prv", "gdp")


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that spends exactly ``epsilon`` (Opacus's ``get_noise_multiplier``)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` DP-SGD steps, from an Opacus accountant (inf without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@register_defense
@dataclass(frozen=True)
class DPSGD(Defense):
    """DP-SGD on the client through Opacus: clip each example's gradient to ``max_grad_norm``,
    add Gaussian noise calibrated to (``epsilon``, ``delta``) over ``rounds`` rounds (default 1;
    an audit spreads it over its utility training's rounds) or of a given ``noise_multiplier``.

    Abadi et al. 2016; Opacus (Yousefpour et al. 2021). Valid for models without BatchNorm."""

    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: int | None = None
    accountant: str = "rdp"
    name = "dp-sgd"
    paper = "Abadi et al. 2016, Deep Learning with Differential Privacy (via Opacus)"
    stage = "client"

    def __post_init__(self):
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("dp-sgd: give exactly one of epsilon and noise_multiplier")
        if self.epsilon is not None:
            positive("dp-sgd", "epsilon", self.epsilon)
        else:
            positive("dp-sgd", "noise_multiplier", self.noise_multiplier)
        if not 0 < positive("dp-sgd", "delta", self.delta) < 1:
            raise ConfigError(f"dp-sgd: delta must be in (0, 1), got {self.delta!r}")
        positive("dp-sgd", "max_grad_norm", self.max_grad_norm)
        if self.rounds is not None:
            count("dp-sgd", "rounds", self.rounds)
        one_of("dp-sgd", "accountant", self.accountant, _ACCOUNTANTS)

    def private_training(self) -> PrivateTraining:
        return PrivateTraining(self.max_grad_norm, self.noise_multiplier, self.epsilon, self.delta, self.rounds or 1,
                               self.accountant)


@register_defense
@dataclass(frozen=True)
class PerExampleClipping(Defense):
    """Clip every example's gradient to ``max_norm`` before averaging, without noise
    (DP-SGD's clipping alone, through Opacus). Spends no privacy budget: epsilon is infinite.

    Abadi et al. 2016. Valid for models without BatchNorm."""

    max_norm: float = 1.0
    name = "per-example-clipping"
    paper = "Abadi et al. 2016 (per-example clipping of DP-SGD, without noise; via Opacus)"
    stage = "client"

    def __post_init__(self):
        positive("per-example-clipping", "max_norm", self.max_norm)

    def private_training(self) -> PrivateTraining:
        return PrivateTraining(self.max_norm, noise_multiplier=0.0)


def _opacus_ready(model: nn.Module) -> nn.Module:
    from opacus.validators import ModuleValidator

    net = copy.deepcopy(model)
    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ConfigError("Opacus cannot compute per-example gradients for this model: "
                          + "; ".join(str(e) for e in errors[:3]) + " (use GroupNorm, or batch_norm=false)")
    return net


def private_client_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup,
                          private: PrivateTraining, *, loss: str = "cross_entropy", spec: DataSpec | None = None,
                          seed: int = 0, model_info: dict | None = None) -> tuple[SharedUpdate, dict[str, Any]]:
    """The client's update under DP-SGD (or per-example clipping), and the privacy it spent.

    FedSGD: one DP-SGD gradient of the whole batch (q = 1). FedAvg: ``local_steps`` (or
    ``epochs`` x ceil(n / b)) DP-SGD steps of learning rate ``setup.lr`` on Poisson-sampled
    batches of expected size b; the delta ``w_local - w_global`` is shared."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    spec = spec or DataSpec()
    n = images.shape[0]
    fedsgd = setup.protocol == "fedsgd"
    batch = n if fedsgd else min(setup.local_batch_size or n, n)
    steps = 1 if fedsgd else (setup.local_steps or setup.epochs * math.ceil(n / batch))
    sample_rate = batch / n
    sigma = private.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(private.epsilon, private.delta, sample_rate, steps * private.rounds, private.accountant)
    params, buffers = model_state(model)
    net = _opacus_ready(model)
    module = GradSampleModule(net, loss_reduction="sum")
    device = images.device
    noise = torch.Generator(device=device).manual_seed(seed * 7_368_787 + 11)
    sampler = torch.Generator().manual_seed(seed * 7_368_787 + 13)
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0 if fedsgd else setup.lr), noise_multiplier=sigma,
                            max_grad_norm=private.max_grad_norm, expected_batch_size=batch, loss_reduction="mean",
                            generator=noise)
    loss_fn = get_loss(loss)
    x = spec.normalize(images)
    for _ in range(steps):
        chosen = torch.arange(n) if fedsgd else torch.nonzero(torch.rand(n, generator=sampler) < sample_rate).reshape(-1)
        chosen = chosen.to(device)
        optimizer.zero_grad(set_to_none=True)
        out = module(x[chosen])
        total = loss_fn(out, labels[chosen]) * chosen.numel() if chosen.numel() else out.sum() * 0
        with warnings.catch_warnings():  # Opacus's hooks fire on outputs when inputs need no grad: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            total.backward()
        if fedsgd:
            optimizer.pre_step()  # clip, add noise, divide by the batch size: p.grad is the DP gradient
        else:
            optimizer.step()
    names = [name for name, _ in net.named_parameters()]
    if fedsgd:
        tensors = {name: p.grad.detach().clone() for name, p in zip(names, module.parameters())}
    else:
        tensors = {name: (p.detach() - params[name]).clone() for name, p in zip(names, module.parameters())}
    module._close()
    privacy = {
        "mechanism": "dp-sgd" if sigma > 0 else "per-example-clipping",
        "noise_multiplier": sigma, "max_grad_norm": private.max_grad_norm, "sample_rate": sample_rate,
        "steps": steps, "rounds": private.rounds, "delta": private.delta, "accountant": private.accountant,
        "epsilon": epsilon_spent(sigma, sample_rate, steps, private.delta, private.accountant),
        "epsilon_budget": epsilon_spent(sigma, sample_rate, steps * private.rounds, private.delta, private.accountant),
    }
    meta = shared_metadata(images, spec, loss, setup.share_labels, labels, params, buffers, model_info,
                           mode="train" if model.training else "eval")
    if fedsgd:
        return SharedUpdate(tensors=tensors, kind="gradient", batch_size=n, **meta), privacy
    return SharedUpdate(tensors=tensors, kind="delta", batch_size=n, local_steps=steps, local_lr=float(setup.lr),
                        local_batch_size=batch, **meta), privacy
