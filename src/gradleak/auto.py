"""``attacks="auto"``: the attacks the analyser finds applicable to an update, exact closed forms first.

A server auditing its own federation should not have to know which attack fits each
client. :func:`plan_attacks` reads the protocol the update records and the analyser's
verdicts (:func:`gradleak.analysis.analyze` at the update's weights, for the minibatch the
client used) and returns the attacks to run, in order:

1. the closed forms (``fc-bias``, ``qian``, ``rgap``, ``copa``) predicted **exact**, then those
   whose exactness is uncertain (``EXACT RECOVERY POSSIBLE``), in the analyser's order;
   only for a gradient or a one-step delta (K > 1 local steps sum gradients taken at
   different weights, which no closed form inverts);
2. gradient matching: ``inverting-gradients`` for a gradient or a one-step delta, ``fedavg``
   (the local steps unrolled) for a delta of several steps.

Nothing is planned when the update cannot be modelled (a delta of unknown learning rate,
an unknown number of examples); the reason is returned instead. The caller runs the plan
in order and stops at the first reconstruction whose update residual certifies it exact
(:mod:`gradleak.residual`): ``gradleak attack FILE`` (its default), the Flower audit
(``LeakageAuditStrategy``'s default) and ``pipeline.attack_auto``.

Options: a plain key (``iterations=300``) goes to every planned attack that takes it; a
key ``NAME.key`` (``inverting-gradients.iterations=300``), or ``{NAME: {key: value}}``, to
attack NAME only. A key no attack of the registry takes is refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .residual import Residual
from .update import SharedUpdate

__all__ = ["AUTO", "CLOSED_FORMS", "TEXT_CLOSED_FORMS", "is_text_model", "PlannedAttack", "plan_attacks",
           "plan_from_verdicts", "analyze_update",
           "analysis_batch", "split_options", "weights_loaded", "AutoAttempt", "better_residual"]

AUTO = "auto"
CLOSED_FORMS = ("fc-bias", "qian", "rgap", "copa")
TEXT_CLOSED_FORMS = ("dager", "bag-of-words")     # text models: exact token recovery (docs/text.md)


def is_text_model(module: nn.Module) -> bool:
    """A gradleak text model (token ids in): its attacks are the text attacks."""
    from .text.models import text_task

    return text_task(module) is not None


@dataclass(frozen=True)
class PlannedAttack:
    """One attack of an automatic plan: its registry ``name``, its ``options`` and why it is planned."""

    name: str
    options: dict[str, Any]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.name, "options": dict(self.options), "reason": self.reason}


@contextlib.contextmanager
def weights_loaded(module: nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """``module`` with the update's weights at the round, its own restored afterwards."""
    if not weights:
        yield
        return
    params = dict(module.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if n in weights}
    try:
        with torch.no_grad():
            for n in saved:
                params[n].copy_(weights[n].to(device=params[n].device, dtype=params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def analysis_batch(update: SharedUpdate) -> int | None:
    """The minibatch one gradient of the update averages: the batch of a gradient, the local
    minibatch of a delta (at most its examples); None when the number of examples is unknown."""
    n = update.batch_size
    if n is None:
        return None
    return min(update.local_batch_size or n, n) if update.kind == "delta" else n


def analyze_update(module: nn.Module, update: SharedUpdate, *, num_classes: int, labels_known: bool = False,
                   numeric: bool = True, batch: int | None = None, input_shape: tuple[int, ...] | None = None,
                   loss: str | None = None):
    """The analyser's report (:func:`gradleak.analysis.analyze`) for ``update``: at the
    weights of its round, for the minibatch ``batch`` (default :func:`analysis_batch`), the
    update's input shape and loss (or the ones given)."""
    from .analysis import analyze

    batch = batch or analysis_batch(update) or 1
    shape = tuple(input_shape or update.input_shape or ())
    if not shape:
        raise ConfigError("the input shape is unknown: the analyser cannot run")
    if is_text_model(module):   # token sequences: the span condition (gradleak.text.analysis)
        from .text.analysis import text_analysis

        with weights_loaded(module, update.weights):
            return text_analysis(module, shape[0], batch, loss or update.loss)
    with weights_loaded(module, update.weights):
        return analyze(module, shape, batch, num_classes=num_classes, loss=loss or update.loss,
                       labels_known=labels_known, numeric=numeric)


def _value(verdict: Any, key: str) -> Any:
    return verdict.get(key) if isinstance(verdict, Mapping) else getattr(verdict, key)


def plan_from_verdicts(verdicts: Sequence[Any], update: SharedUpdate, options: Mapping[str, Any] | None = None, *,
                       text: bool = False) -> tuple[list[PlannedAttack], str]:
    """The plan from the analyser's per-attack verdicts (``AttackVerdict`` objects or their
    JSON) for ``update``'s protocol, and a sentence saying why it is what it is. ``text``: the
    model is a text model (the plan is :func:`_text_plan`'s)."""
    if update.kind == "delta" and update.local_lr is None:
        return [], "the delta's learning rate is unknown: no attack can model its local steps"
    if update.batch_size is None:
        return [], "the number of examples is unknown: no attack knows how many images to reconstruct"
    multi = update.kind == "delta" and update.local_steps > 1
    if text or any(_value(v, "attack") in TEXT_CLOSED_FORMS for v in verdicts):
        return _text_plan(verdicts, update, options or {}, multi)
    plan: list[PlannedAttack] = []
    if not multi:
        closed = [v for v in verdicts if _value(v, "attack") in CLOSED_FORMS and _value(v, "applies")]
        for wanted, words in ((True, "exact recovery predicted"), (None, "exact recovery possible")):
            plan += [PlannedAttack(_value(v, "attack"), {}, f"{words}: {_value(v, 'reason')}")
                     for v in closed if _value(v, "exact") is wanted]
    if multi:
        plan.append(PlannedAttack("fedavg", {}, f"{update.local_steps} local steps: gradient matching unrolls them "
                                                "(approximate)"))
    else:
        plan.append(PlannedAttack("inverting-gradients", {}, "gradient matching always applies (approximate)"))
    why = ("closed forms first (" + ", ".join(p.name for p in plan[:-1]) + "), then gradient matching"
           if len(plan) > 1 else "no closed form applies" + (" to several local steps" if multi else "")
           + ": gradient matching only")
    return _with_options(plan, options or {}), why


def _text_plan(verdicts, update: SharedUpdate, options: Mapping[str, Any], multi: bool):
    """A text update's plan: the span attack and the bag of words where they apply (exact first),
    then TAG's gradient matching on a classifier; a sum of local steps is refused, naming why."""
    if multi:
        return [], (f"{update.local_steps} local steps: the text attacks invert one gradient (the span of a weight "
                    "gradient, the rows of the embedding gradient); a sum of steps taken at different weights mixes "
                    "spans and rows, and gradient matching on token embeddings does not unroll steps")
    applies = [v for v in verdicts if _value(v, "applies")]
    plan = [PlannedAttack(_value(v, "attack"), {}, f"{'exact recovery predicted' if _value(v, 'exact') else 'applies'}:"
                          f" {_value(v, 'reason')}")
            for wanted in (True, False) for v in applies
            if _value(v, "attack") in TEXT_CLOSED_FORMS and bool(_value(v, "exact")) is wanted]
    if any(_value(v, "attack") == "tag" for v in applies):
        plan.append(PlannedAttack("tag", {}, "gradient matching on token embeddings always applies to a classifier "
                                             "(approximate)"))
    why = ("text: " + ", ".join(p.name for p in plan) if plan else
           "text: no text attack applies to this update (a causal LM whose span attack refuses, or LoRA adapters)")
    return _with_options(plan, options), why


def plan_attacks(module: nn.Module, update: SharedUpdate, *, num_classes: int, labels_known: bool = False,
                 options: Mapping[str, Any] | None = None, numeric: bool = True) -> tuple[list[PlannedAttack], str]:
    """The attacks ``attacks="auto"`` runs on ``update`` (see the module's notes), and why.
    The analyser runs only when a closed form could apply (a gradient or a one-step delta)."""
    verdicts: list[Any] = []
    modelled = not (update.kind == "delta" and update.local_lr is None) and update.batch_size is not None
    if modelled and not (update.kind == "delta" and update.local_steps > 1):
        verdicts = analyze_update(module, update, num_classes=num_classes, labels_known=labels_known,
                                  numeric=numeric).attacks
    return plan_from_verdicts(verdicts, update, options, text=is_text_model(module))


def _accepted(name: str) -> set[str]:
    """The keyword options attack ``name`` takes."""
    from .attacks import get_attack
    from .attacks.optimization import GradientMatching, MatchingConfig

    cls = get_attack(name)
    if issubclass(cls, GradientMatching):
        return {f.name for f in dataclasses.fields(MatchingConfig)}
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY}


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(plain, {attack: scoped})`` from ``{"key": v, "NAME.key": v, "NAME": {key: v}}``; every
    key checked against what the registry's attacks take (a ConfigError names an unknown one)."""
    from .attacks import ATTACKS

    plain: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ConfigError(f"attacks='auto': option names are strings, got {key!r}")
        if key in ATTACKS and isinstance(value, Mapping):
            scoped.setdefault(key, {}).update(value)
        elif "." in key and key.split(".", 1)[0] in ATTACKS:
            name, option = key.split(".", 1)
            scoped.setdefault(name, {})[option] = value
        else:
            plain[key] = value
    for name, values in scoped.items():
        unknown = sorted(set(values) - _accepted(name))
        if unknown:
            raise ConfigError(f"attacks='auto': attack {name!r} takes no option {unknown[0]!r}")
    runs = (*CLOSED_FORMS, "inverting-gradients", "fedavg", *TEXT_CLOSED_FORMS, "tag")
    known = set().union(*(_accepted(n) for n in runs))
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ConfigError(f"attacks='auto': no attack it may run takes option {unknown[0]!r} ({', '.join(runs)})")
    return plain, scoped


def _with_options(plan: list[PlannedAttack], options: Mapping[str, Any]) -> list[PlannedAttack]:
    plain, scoped = split_options(options)
    out = []
    for step in plan:
        accepted = _accepted(step.name)
        mine = {k: v for k, v in plain.items() if k in accepted}
        mine.update(scoped.get(step.name, {}))
        out.append(dataclasses.replace(step, options=mine))
    return out


@dataclass
class AutoAttempt:
    """One attack ``attacks="auto"`` ran: ``status`` ok, not applicable, failed or interrupted (``message``
    says why), why it was planned, its update residual, its time."""

    attack: str
    status: str
    reason: str
    message: str = ""
    residual: Residual | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "status": self.status, "reason": self.reason, "message": self.message,
                "residual": None if self.residual is None else self.residual.to_json(),
                "seconds": round(self.seconds, 3), "options": dict(self.options)}


def better_residual(residual: Residual, best: Residual | None) -> bool:
    """Certified beats uncertified; then the lower residual; a residual that is not a number loses."""
    if best is None:
        return True
    if residual.certified != best.certified:
        return residual.certified
    mine = residual.value if residual.value is not None and residual.value == residual.value else float("inf")
    theirs = best.value if best.value is not None and best.value == best.value else float("inf")
    return mine < theirs
