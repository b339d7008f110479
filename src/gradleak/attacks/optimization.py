"""Optimisation-based gradient inversion: one gradient-matching engine, the methods as presets.

Dummy inputs (and, where unknown, soft labels) are optimised so that the gradient, or
the FedAvg weight delta, they produce matches the observed one (DLG, Zhu et al. 2019;
iDLG, Zhao et al. 2020; Inverting Gradients, Geiping et al. 2020, arXiv 2003.14053).
Everything a method chooses is a field of :class:`MatchingConfig`; :class:`GradientMatching`
runs any configuration, and the named methods (``dlg``, ``idlg``, ``inverting-gradients``,
``fedavg``) are subclasses that only change the defaults.

The candidate lives in the model's input space (normalized with the data spec); the box
constraint keeps it inside the image of [0, 1]. FedAvg deltas are matched by unrolling
the client's K local SGD steps differentiably (Geiping et al. §5): step k trains on the
dummy minibatch ``k * b mod B``. Restarts run batched with ``torch.func.vmap`` where the
optimiser is element-wise (Adam, SGD) and no BatchNorm is in train mode (eval-mode BatchNorm
is a fixed affine map per channel: ``auto`` batches it on CUDA, ``batched_restarts="vmap"``
anywhere), looped otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from typing import Any, Callable, ClassVar

import torch
from torch.func import grad

from ..data.spec import DataSpec
from ..errors import AttackNotApplicable, ConfigError
from ..functional import batch_norm_in_train_mode, forward, has_batch_norm, task_loss
from ..limits import check_batch
from ..losses import get_loss
from ..shares import MIXTURE_PARTS_NOTE
from ..update import SharedUpdate
from ._continuation import relu_continuation
from ._engine import run_group
from ._problem import Problem, choice_note, target_data
from ._layers import classifier_layer, trace_linear_layers
from ._separated import feature_mismatch, separated_output_gradient
from ._mixture import check_mixture, fitted_weights, mixture_loss, per_image_gradients
from ._screening import screen_restarts
from .base import Attack, Reconstruction, register_attack
from .labels import candidate_labels
from .matching import (
    BatchNormStatistics,
    batch_norm_targets,
    gradient_distance,
    layer_weights,
    observed_output_gradient,
    output_functional,
    select_layers,
    total_variation,
)
from .matching_config import MatchingConfig

__all__ = ["MatchingConfig", "GradientMatching", "DLG", "IDLG", "InvertingGradients", "FedAvgInversion"]

@register_attack
class GradientMatching(Attack):
    """The gradient-matching engine; ``GradientMatching(model, threat, **config_fields)``."""

    name = "gradient-matching"
    paper = "engine of DLG (Zhu et al. 2019), iDLG (Zhao et al. 2020), Inverting Gradients (Geiping et al. 2020)"
    conditions = "model twice differentiable in its input; batch size known; labels given, inferable or optimised"
    preset: ClassVar[MatchingConfig] = MatchingConfig()

    def __init__(self, model, threat=None, config: MatchingConfig | None = None, **overrides):
        super().__init__(model, threat)
        fields = {f.name for f in dataclasses.fields(MatchingConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {unknown}; options are {sorted(fields)}")
        self.config = replace(config or self.preset, **overrides)

    def options(self):
        return {**super().options(), **self.config.to_json()}

    def input_prior(self, x: torch.Tensor) -> torch.Tensor | None:
        """A prior on the candidate inputs added to the matching loss (None: none). Subclasses
        override it (LAMP's embedding-norm prior, :mod:`.text_matching`); a pure function of ``x``."""
        return None

    # ------------------------------------------------------------------ labels
    # -------------------------------------------------------------- objective
    def _objective(self, update, params, buffers, own, names, weights, bn, feature_layer=None) -> Callable:
        """``objective(x, y_soft, data=None)``: the matching loss of candidate ``x`` against this
        update, or against ``data`` = {"target": matched entries, "labels": labels} of another
        update of the same shapes (several targets attacked in one ``vmap``); ``feature_layer``: the
        classifier weight whose simulated gradient gives the separated features' term."""
        cfg, loss_fn = self.config, get_loss(update.loss)
        binary = update.loss == "binary_cross_entropy"
        if update.kind == "delta":
            if update.local_lr is None:
                raise AttackNotApplicable("the delta's local learning rate is unknown: the local steps cannot be unrolled",
                                          condition="FedAvg learning rate known")
            steps, lr = update.local_steps, update.local_lr

        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        scale_free = update.kind == "gradient" and cfg.objective in SCALE_FREE_OBJECTIVES
        fitted = cfg.mixture == "fitted"

        def flat_target(data):
            return torch.cat([data["target"][n].reshape(-1) for n in names]).double()

        own_target = flat_target(own) if fitted else None   # this update's, flattened once (the hot path's data)

        def mixture_weights(x, y, data, parts=False):
            """The candidates' fitted mixture weights against ``data``'s target (_mixture.py), held fixed;
            ``parts``: each candidate's part of the fitted mixture instead."""
            target = own_target if data is own else flat_target(data)
            weights, explained = fitted_weights(per_image_gradients(self.model, params, buffers, loss_fn, x, y, names),
                                                target)
            return explained if parts else weights

        def inner_gradient(local, x, y, functional, delta=None, mixture=None):
            # delta: the observed output gradient (output_gradient='observed'), else the loss at labels y, the batch's
            # mean or (mixture) its fitted mixture
            if delta is not None:
                inner = output_functional(self.model, buffers, x, delta)
            elif mixture is not None:
                inner = mixture_loss(self.model, buffers, loss_fn, x, y, mixture)
            else:
                inner = task_loss(self.model, buffers, loss_fn, x, y)
            if scale_free:
                inner = loss_scaled_to_one(inner)
            if functional:  # inside torch.func transforms (vmap over restarts)
                return grad(inner)(local)
            value = inner(local)
            # materialize_grads: a parameter the candidate does not reach (a text model's token table, when the
            # candidate is the embeddings themselves) has gradient zero, as under torch.func.grad
            return dict(zip(local, torch.autograd.grad(value, list(local.values()), create_graph=True,
                                                       allow_unused=True, materialize_grads=True)))

        def objective(x, y_soft, data=None, functional=True):
            """The matching loss of candidate ``x``; ``functional=False`` uses plain autograd (faster for one restart)."""
            data = own if data is None else data
            target = data["target"]
            y = data.get("labels") if y_soft is None else (torch.sigmoid(y_soft) if binary else y_soft.softmax(-1))
            start = params if functional else leaves
            if update.kind == "gradient":
                mix = mixture_weights(x, y, data) if fitted and x.shape[0] > 1 else None
                sim = inner_gradient(start, x, y, functional, data.get("output_gradient"), mix)
            else:
                batch = min(update.local_batch_size or x.shape[0], x.shape[0])
                local = dict(start)
                for k in range(steps):
                    idx = [(k * batch + j) % x.shape[0] for j in range(batch)]
                    g = inner_gradient(local, x[idx], y[idx], functional)
                    local = {n: local[n] - lr * g[n] for n in local}
                sim = {n: local[n] - start[n] for n in names}
            value = gradient_distance(sim, target, names, weights, cfg.objective, uniform=cfg.layer_weights == "equal")
            if "features" in data:   # each candidate against its image's separated features (_output_separation.py)
                value = value + cfg.features * feature_mismatch(sim[feature_layer], data)
            if cfg.tv:
                value = value + cfg.tv * total_variation(x)
            if cfg.l2:
                value = value + cfg.l2 * x.pow(2).mean()
            prior = self.input_prior(x)
            if prior is not None:
                value = value + prior
            if bn is not None:
                with bn:
                    forward(self.model, params, buffers, x)
                value = value + cfg.bn * bn.penalty()
            return value

        objective.mixture_weights = mixture_weights if fitted else None
        return objective

    def _restart_groups(self, params, bn) -> tuple[bool, list[list[int]]]:
        """Whether the restarts run batched under ``vmap``, and which run together: all in one
        group when batched or when the group-consistency term ties them, else one by one."""
        cfg = self.config
        vmappable = (cfg.optimizer != "lbfgs" and not batch_norm_in_train_mode(self.model) and bn is None
                     and cfg.mixture == "mean")
        cuda = next(iter(params.values())).is_cuda
        batched = cfg.batched_restarts == "vmap" or (
            cfg.batched_restarts == "auto" and vmappable and cfg.restarts > 1 and (cuda or (
                not has_batch_norm(self.model) and sum(p.numel() for p in params.values()) < 1_000_000)))
        if batched and not vmappable:  # auto on the CPU: benchmarks/restarts.py; on CUDA vmap fills the device
            raise ConfigError("batched_restarts='vmap' needs Adam or SGD and a model without BatchNorm in train mode")
        together = batched or cfg.group > 0
        if cfg.compile:
            self._check_compilable(lockstep=together and not batched and cfg.restarts > 1, bn=bn)
        return batched, [list(range(cfg.restarts))] if together else [[r] for r in range(cfg.restarts)]

    def _check_compilable(self, lockstep: bool, bn) -> None:
        """``compile=True`` compiles the functional evaluation (``grad_and_value``, vmapped over
        several slots): refuse, naming the condition, what cannot run through it."""
        training_bn = [n for n, m in self.model.named_modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        if training_bn:
            raise ConfigError(f"compile=True needs BatchNorm in eval mode (model.eval()); {training_bn[0]!r} is in "
                              "train mode")
        if bn is not None:
            raise ConfigError("compile=True cannot run with the BatchNorm-statistics prior (bn > 0)")
        if lockstep:
            raise ConfigError("compile=True cannot run restarts one by one in lockstep (group > 0 with L-BFGS or "
                              "BatchNorm): use batched_restarts or group=0")

    # ------------------------------------------------------------------ main
    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        if self.config.smooth_relu:   # two passes: softplus stand-in, then the exact model (_continuation.py)
            return relu_continuation(self, update)
        problem = self._problem(update)
        runs: list = []
        groups, screened = problem.groups, None
        if self.config.screen is not None:
            screened = screen_restarts(self, problem)
            if screened.interrupted:   # Ctrl-C while screening: the best screened iterate, marked interrupted
                return self._result(problem, screened.runs)
            groups = [[screened.chosen]]
        for group in groups:
            runs += run_group(self, problem.objective, group, problem.shape, problem.classes, problem.labels is None,
                              problem.bounds, problem.spec, update.loss, vectorized=problem.batched)
            if runs[-1].interrupted:  # Ctrl-C: keep the best so far, run no further restart
                break
        result = self._result(problem, runs)
        if screened is not None:
            result.notes.append(screened.note)
        return result

    def reconstruct_many(self, updates, *, monitors=None, progress=None):
        """Reconstruct independent updates (the images of an audit, the clients of a round),
        yielding one :class:`Reconstruction` per update in order. Runs of consecutive updates
        of the same model, shapes and protocol are optimised together in one ``vmap`` over
        targets x restarts where the configuration allows it (:mod:`._targets`): the same
        reconstructions, more of them per second; otherwise one after the other."""
        from ._targets import reconstruct_targets

        yield from reconstruct_targets(self, list(updates), monitors, progress)

    def _problem(self, update: SharedUpdate) -> Problem:
        """Everything the loop needs to attack ``update`` (labels, matched entries, objective, shapes)."""
        cfg = self.config
        if update.input_shape is None:
            raise ConfigError("the input shape is unknown: give ThreatModel(input_shape=(C, H, W)) or carry it in the update")
        batch = update.batch_size or cfg.batch_size
        if batch is None:
            raise ConfigError("the batch size is hidden by the threat model: give the option batch_size=B")
        check_batch("batch size", batch, update.input_shape)
        whole, batch = batch, self._carried(batch)
        check_batch(f"{cfg.restarts} restarts x batch size", cfg.restarts * batch, update.input_shape)
        params, buffers = self.parameters_at_round(update)
        ref = next(iter(params.values()))
        spec = update.data_spec or DataSpec()
        head = classifier_layer(trace_linear_layers(self.model, update.input_shape, params, buffers))
        labels, label_note = candidate_labels(self.config, self.model, update, params, buffers, batch, head,
                                              partial=batch < whole)
        if batch < whole:
            label_note = f"{batch} of the batch's {whole} images reconstructed (carried={batch}); {label_note}"
        names = select_layers(list(params), update.tensors, cfg.layers)
        weights = layer_weights(len(names), cfg.layer_weights, dtype=ref.dtype, device=ref.device)
        if cfg.mixture == "fitted":
            check_mixture(self.model, update)
        bn = None
        if cfg.bn > 0:
            if update.buffers is None:
                raise AttackNotApplicable("bn > 0 needs the client's BatchNorm statistics",
                                          condition="ThreatModel(bn_statistics=True) and an update with buffers")
            bn = BatchNormStatistics(self.model, batch_norm_targets(self.model, buffers, update.buffers))
        if cfg.output_gradient == "separated":   # every image's own output gradient (_output_separation.py)
            separated, found, note = separated_output_gradient(update, head, params, labels, whole, batch,
                                                               weights.dtype, cfg.features)
            labels, label_note = found, note if labels is None else f"{label_note}; {note}"
        data = target_data(update, names, weights.dtype, labels)
        if cfg.output_gradient == "separated":
            data.update(separated)
            delta, delta_note = separated["output_gradient"], ""
        else:
            delta, delta_note = observed_output_gradient(update, head, batch, cfg.output_gradient)
        if delta is not None:
            data["output_gradient"] = delta.to(weights.dtype)
            approximate = "" if batch == whole else f" of a batch of {whole}: exact where one image carries the update"
            label_note = f"{label_note}; {delta_note}{approximate}" if delta_note else label_note
        objective = self._objective(update, params, buffers, data, names, weights, bn, head and head.param("weight"))
        zeros = torch.zeros((1, *update.input_shape), dtype=ref.dtype, device=ref.device)
        batched, groups = self._restart_groups(params, bn)
        return Problem(update, objective, data, labels, label_note,
                        names, params, bn, (batch, *update.input_shape), head.out_features if head is not None else 1,
                        (spec.normalize(zeros), spec.normalize(zeros + 1)), spec, batched, groups)

    def _carried(self, batch: int) -> int:
        """The images reconstructed: the batch's, or ``carried`` of them (at most the batch)."""
        carried = self.config.carried
        if carried is None:
            return batch
        if carried > batch:
            raise ConfigError(f"carried={carried} is more than the batch's {batch} images")
        return carried

    def _result(self, problem: Problem, runs: list) -> Reconstruction:
        """The reconstruction of one update from its restarts' results: the lowest matching loss wins."""
        cfg, update, names, labels, spec = self.config, problem.update, problem.names, problem.labels, problem.spec
        batched = problem.batched
        best = min(runs, key=lambda run: run.loss if math.isfinite(run.loss) else math.inf)
        history: dict[str, Any] = {}
        for run in runs:
            if run.consensus:
                continue
            suffix = f"[{run.restart}]" if cfg.restarts > 1 else ""
            for key, series in run.history.items():
                history[f"{key}{suffix}"] = series
        if best.y_soft is not None:
            labels = best.y_soft.argmax(-1) if update.loss != "binary_cross_entropy" else (best.y_soft > 0).long().reshape(-1)
        notes = [problem.label_note, f"matched {len(names)} of {len(update.tensors)} entries ({cfg.objective}, {cfg.layer_weights} weights)",
                 choice_note(cfg, runs, best, batched)]
        if cfg.mixture == "fitted" and best.x.shape[0] > 1:
            binary = update.loss == "binary_cross_entropy"     # the objective's soft labels, as it maps them
            y = labels if best.y_soft is None else torch.sigmoid(best.y_soft) if binary else best.y_soft.softmax(-1)
            w = problem.objective.mixture_weights(best.x, y, problem.data, parts=True)
            notes.append(MIXTURE_PARTS_NOTE + ", ".join(f"{v:.3f}" for v in w.tolist()))
        if cfg.precondition:
            notes.append(f"spectral preconditioning: image gradient spectrum x |f|^-{2 * cfg.precondition:g}")
        notes += [note for run in runs for note in run.notes]
        interrupted = runs[-1].interrupted
        if interrupted and len(runs) < cfg.restarts:
            notes.append(f"interrupted: {len(runs)} of {cfg.restarts} restarts run")
        return Reconstruction(images=spec.denormalize(best.x).detach(), labels=None if labels is None else labels.detach(),
                              history=history, notes=notes, interrupted=interrupted)


# distances that a positive factor on the candidate's gradient leaves unchanged
SCALE_FREE_OBJECTIVES = ("cosine", "layer-cosine")


def loss_scaled_to_one(loss: Callable) -> Callable:
    """``loss`` times the power of two that brings its detached magnitude into [1, 2) (at most
    ``2^23`` for a loss below float32's epsilon): the same gradient direction, at a scale near one.

    A candidate a trained network classifies confidently has a cross-entropy that rounds to 0 in
    float32 (``1 - p`` below epsilon) while its gradient is ~1e-9 to 1e-40; through a deep
    network's backward and the matching objective's double backward the values then go
    subnormal, which CPUs process many times slower and with fewer significant bits (measured,
    ``benchmarks/subnormal.py``: a trained ResNet20-4 digit, client update norm 4e-9, 4.40 s per
    iteration unscaled, 0.41 s with the factor). For a scale-free distance (cosine) a positive constant on
    the candidate's gradient changes neither the objective nor its gradient (the cosine's
    gradient is homogeneous of degree -1); a power of two changes no bit except where it keeps a
    value from underflowing.
    """
    def scaled(params):
        value = loss(params)
        size = value.detach().abs().clamp_min(torch.finfo(value.dtype).eps)
        return value * torch.exp2(-torch.floor(torch.log2(size)))
    return scaled


@register_attack
class DLG(GradientMatching):
    """Deep Leakage from Gradients (Zhu et al. 2019): squared L2 matching, L-BFGS (lr 1,
    history 100, 20 inner iterations), dummy input and soft labels optimised jointly, 300 steps.
    Valid for twice-differentiable models (sigmoid LeNet); small batches.

    One deliberate difference from DLG's code: L-BFGS uses a strong-Wolfe line search. With
    the fixed unit step of the original, L-BFGS stalls within a few steps on most of the
    built-in photos (measured: matching loss stuck near 10 on sigmoid LeNet); pass
    ``line_search=None`` for the original behaviour."""

    name = "dlg"
    paper = "Zhu, Liu, Han 2019, Deep Leakage from Gradients (NeurIPS)"
    conditions = "twice-differentiable model (e.g. sigmoid activations); small batch"
    preset = MatchingConfig(objective="l2", optimizer="lbfgs", lr=1.0, signed=None, boxed=False, schedule="none",
                            iterations=300, labels="optimize", record_every=1)


@register_attack
class IDLG(GradientMatching):
    """iDLG (Zhao et al. 2020): the label from the sign of the classifier gradient (batch 1),
    then DLG with the label fixed."""

    name = "idlg"
    paper = "Zhao, Mopuri, Bilen 2020, iDLG: Improved Deep Leakage from Gradients (arXiv 2001.02610)"
    conditions = "batch size 1 for the label rule (batches: labels are counted instead); cross-entropy"
    preset = replace(DLG.preset, labels="infer")


@register_attack
class InvertingGradients(GradientMatching):
    """Inverting Gradients (Geiping et al. 2020): cosine similarity over all layers plus total
    variation, Adam (lr 0.1) on the sign of the input gradient, box constraint, step decay at
    3/8, 5/8, 7/8 of 4,800 iterations, restarts scored by the matching loss."""

    name = "inverting-gradients"
    paper = "Geiping, Bauermeister, Droege, Moeller 2020, Inverting Gradients (NeurIPS; arXiv 2003.14053)"
    conditions = "labels given or inferable (or optimised); batch size known; for deltas, the local lr and steps known"
    preset = MatchingConfig(tv=1e-2)


@register_attack
class FedAvgInversion(InvertingGradients):
    """Inverting Gradients for FedAvg weight deltas (Geiping et al. §5): the K local SGD steps
    of known learning rate are unrolled differentiably and the simulated delta is matched."""

    name = "fedavg"
    paper = "Geiping et al. 2020, §5 (multiple local steps)"
    conditions = "a FedAvg delta with known local learning rate, steps and minibatch size"
    training_details = True    # the local schedule is unrolled: SoK threat model C

    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        if update.kind != "delta":
            raise AttackNotApplicable("fedavg matches weight deltas; this update is a gradient (use inverting-gradients)",
                                      condition="update kind 'delta'")
        return super()._reconstruct(update)
