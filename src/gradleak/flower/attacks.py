"""One attack on one update, as the audit and the gate run it, with its outcome in one record.

:func:`run_attack` goes through gradleak's own pipeline (:func:`~gradleak.pipeline.make_attack`
and :func:`~gradleak.pipeline.attack_updates`), so an audited reconstruction is exactly what
``gradleak attack`` gives on the same update file. It never raises for the attack's own
failures: an attack whose conditions fail is ``not applicable`` with the failed condition,
any other error is ``failed`` with one line. Ground truth, when given, is used only to
score (evaluation), never by the attack. Every reconstruction gets its update residual
(:mod:`gradleak.residual`), the truth-free measure: what a server without the clients' data
can act on. :func:`run_auto` runs ``attacks="auto"``: the plan :mod:`gradleak.auto` makes
from the analyser's verdicts, stopping at the first reconstruction certified exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..attacks.base import Reconstruction
from ..auto import AUTO
from ..errors import AttackNotApplicable, ConfigError, one_line
from ..models.spec import BuiltModel
from ..residual import Residual
from ..update import SharedUpdate

__all__ = ["AttackOutcome", "run_attack", "run_auto", "parse_attacks", "is_auto", "best_residual"]


@dataclass
class AttackOutcome:
    """What one attack recovered from one update, scored when the truth is known.

    ``status``: ``ok`` (it ran), ``not applicable`` (its conditions fail; ``message`` says
    which), ``failed`` (an error, in one line) or ``skipped`` (``message`` says why).
    ``residual``: the update residual of the reconstruction (truth-free; ``certified`` when
    it certifies the reconstruction exact). ``psnr``/``ssim``: per true image, after
    matching, when the truth is known. ``images``: the reconstructions, in the truth's order
    when there is one (for the report's grids; not in the JSON); ``reconstruction``: the
    attack's result as it came (saved beside the captured update). ``reason``: why
    ``attacks="auto"`` planned it. ``saved``: the file the reconstruction was saved to."""

    attack: str
    status: str
    message: str = ""
    seconds: float = 0.0
    psnr: list[float] | None = None
    ssim: list[float] | None = None
    label_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None
    residual: Residual | None = None
    reconstruction: Reconstruction | None = None
    reason: str = ""
    saved: str | None = None
    text: dict[str, float] | None = None     # a text attack scored against the true tokens: ROUGE, exact sequences

    @property
    def certified(self) -> bool:
        return self.residual is not None and self.residual.certified

    @property
    def residual_value(self) -> float | None:
        return None if self.residual is None else self.residual.value

    @property
    def psnr_mean(self) -> float | None:
        if not self.psnr:
            return None
        finite = [v for v in self.psnr if v is not None and not math.isnan(v)]
        return sum(finite) / len(finite) if finite else None

    @property
    def ssim_mean(self) -> float | None:
        values = [v for v in self.ssim or [] if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "status": self.status, "message": self.message,
                "seconds": round(self.seconds, 3), "residual": None if self.residual is None else self.residual.to_json(),
                "certified": self.certified, "psnr": self.psnr, "psnr_mean": self.psnr_mean,
                "ssim": self.ssim, "ssim_mean": self.ssim_mean, "label_accuracy": self.label_accuracy,
                "reason": self.reason, "reconstruction": self.saved, "notes": list(self.notes), "text": self.text}


def parse_attacks(attacks: Any) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options)]`` from a name, a ``(name, options)`` pair, or a sequence of either;
    ``"auto"`` (or ``("auto", options)``) stands alone, its options checked up front."""
    out = _parse(attacks)
    if any(name == AUTO for name, _ in out):
        if len(out) > 1:
            raise ConfigError("attacks: 'auto' plans the attacks itself; give it alone, or list the attacks to run")
        from ..auto import split_options

        split_options(out[0][1])
    return out


def is_auto(attacks: list[tuple[str, dict[str, Any]]]) -> bool:
    return len(attacks) == 1 and attacks[0][0] == AUTO


def _parse(attacks: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(attacks, str):
        return [(attacks, {})]
    if isinstance(attacks, tuple) and len(attacks) == 2 and isinstance(attacks[0], str) and isinstance(
            attacks[1], Mapping):
        return [(attacks[0], dict(attacks[1]))]
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in attacks or ():
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(
                entry[1], Mapping):
            out.append((entry[0], dict(entry[1])))
        else:
            raise ConfigError(f"an attack is a name or a (name, options) pair, got {entry!r}")
    return out


def _options(name: str, options: Mapping[str, Any], time_budget: float | None) -> dict[str, Any]:
    """The attack's options, with ``time_budget`` added for gradient-matching attacks that set none."""
    from ..attacks import get_attack
    from ..attacks.optimization import GradientMatching

    options = dict(options)
    if time_budget is not None and "time_budget" not in options and issubclass(get_attack(name), GradientMatching):
        options["time_budget"] = float(time_budget)
    return options


def run_attack(name: str, options: Mapping[str, Any], built: BuiltModel, update: SharedUpdate, threat: Any, *,
               truth: tuple[torch.Tensor, torch.Tensor] | None = None,
               time_budget: float | None = None) -> AttackOutcome:
    """Attack ``update`` with gradleak's attack ``name`` on ``built.module`` under ``threat``;
    score against ``truth`` = (images, labels) when given."""
    from ..metrics import match, score
    from ..pipeline import attack_with_residuals, make_attack

    start = time.perf_counter()
    outcome = AttackOutcome(name, "ok")
    try:
        attack = make_attack(name, built.module, threat, _options(name, options, time_budget))
        update = update.validate_for(built.module).to(dtype=built.dtype, device=built.device)
        images = labels = None
        if truth is not None:   # images (scored by PSNR) or token ids (by ROUGE)
            images = truth[0].to(built.device)
            labels = None if truth[1] is None else truth[1].to(built.device)
            images = images.to(built.dtype) if images.is_floating_point() else images
        monitored = images is not None and images.is_floating_point()     # PSNR curves: images only
        rec, (outcome.residual,) = attack_with_residuals(attack, [update], truths=[images] if monitored else None,
                                                         quiet=True)
        outcome.notes = [str(n) for n in rec.notes][:20]
        outcome.reconstruction = Reconstruction(None if rec.images is None else rec.images.detach().cpu(),
                                                None if rec.labels is None else rec.labels.detach().cpu(),
                                                attack=rec.attack,
                                                tokens=None if rec.tokens is None else rec.tokens.detach().cpu())
        if images is not None and rec.tokens is not None and not images.is_floating_point():
            outcome.text = _text_scores(rec.tokens, images)
        elif images is not None and rec.images is not None and rec.images.shape[1:] == images.shape[1:]:
            scores = score(rec.images, images, predicted_labels=rec.labels, true_labels=labels, use_lpips=False)
            rows = sorted(scores.per_image, key=lambda r: r["index"])
            outcome.psnr = [None if r["psnr"] is None else float(r["psnr"]) for r in rows]  # None: not recovered
            outcome.ssim = [None if r["ssim"] is None else float(r["ssim"]) for r in rows]
            outcome.label_accuracy = scores.summary.get("label_accuracy")
            perm = match(rec.images, images)
            outcome.images = rec.images[perm.clamp_min(0)].detach().cpu()
        elif rec.images is not None:
            outcome.images = rec.images.detach().cpu()
    except AttackNotApplicable as error:
        outcome.status, outcome.message = "not applicable", one_line(error, 300)
    except Exception as error:  # noqa: BLE001 - an audit never stops training: record the failure in one line
        outcome.status, outcome.message = "failed", f"{type(error).__name__}: {one_line(error, 300)}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def _text_scores(tokens: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """ROUGE-1/2, token accuracy and exact sequences of recovered token ids against the true ones (the
    built-in tokenizer decodes them for ROUGE)."""
    from ..text.corpus import load_tokenizer
    from ..text.metrics import score_text

    summary = score_text(tokens.cpu(), truth.cpu(), load_tokenizer()).summary
    return {k: float(summary[k]) for k in ("rouge1", "rouge2", "token_accuracy", "exact_rate", "token_set_recall")}


def best_psnr(outcomes: Sequence[AttackOutcome]) -> float | None:
    """The highest mean PSNR among the attacks that ran and were scored."""
    values = [o.psnr_mean for o in outcomes if o.status == "ok" and o.psnr_mean is not None]
    return max(values) if values else None


def best_residual(outcomes: Sequence[AttackOutcome]) -> AttackOutcome | None:
    """The outcome with the best update residual: a certified one first, then the lowest."""
    from ..auto import better_residual

    best = None
    for outcome in outcomes:
        if outcome.status == "ok" and outcome.residual is not None and outcome.residual.value is not None and (
                best is None or better_residual(outcome.residual, best.residual)):
            best = outcome
    return best


def run_auto(options: Mapping[str, Any], built: BuiltModel, update: SharedUpdate, threat: Any, *,
             verdicts: Sequence[Any] | None = None, truth: tuple[torch.Tensor, torch.Tensor] | None = None,
             time_budget: float | None = None) -> list[AttackOutcome]:
    """``attacks="auto"`` on one update: the plan of :func:`gradleak.auto.plan_from_verdicts`
    (the analyser's ``verdicts`` for this update, e.g. from its explanation; None: the
    analyser runs here), each attack through :func:`run_attack`, stopping at the first
    reconstruction certified exact. An update no attack can model gives one ``skipped``
    outcome saying why."""
    from ..auto import plan_attacks, plan_from_verdicts

    observed = threat.observe(update)
    if verdicts is None:
        plan, why = plan_attacks(built.module, observed, num_classes=built.num_classes,
                                 labels_known=threat.labels_known, options=options)
    else:
        from ..auto import is_text_model

        plan, why = plan_from_verdicts(verdicts, observed, options, text=is_text_model(built.module))
    if not plan:
        return [AttackOutcome(AUTO, "skipped", why)]
    outcomes = []
    for step in plan:
        outcome = run_attack(step.name, step.options, built, update, threat, truth=truth, time_budget=time_budget)
        outcome.reason = step.reason
        outcomes.append(outcome)
        if outcome.certified:
            break
    return outcomes
