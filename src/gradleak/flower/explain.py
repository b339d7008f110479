"""Why a client's update leaks, or does not: the analyser's verdict for the protocol it ran.

:func:`explain` puts two things side by side. The architecture: :func:`gradleak.analysis.analyze`
on the model *at the round's weights* for the minibatch the client actually used (which
closed-form attacks apply, and whether exact recovery is predicted). The protocol: one
local step of known learning rate makes the delta ``-lr`` times one gradient, so the
analyser's verdict holds as is; K > 1 local steps sum K gradients taken at different
weights, which no closed form inverts and optimisation attacks can only approximate by
unrolling; an unknown learning rate or number of steps means the steps cannot be unrolled
at all; train-mode BatchNorm couples the images of a minibatch; how many examples, and
which parameters were shared. So "nothing came back" always comes with its reason.

Verdicts, strongest first: ``EXACT RECOVERY PREDICTED``, ``EXACT RECOVERY POSSIBLE``,
``APPROXIMATE RECOVERY ONLY`` (optimisation attacks apply), ``NOT ATTACKABLE AS SHARED``
(what the server knows does not let any attack run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, MutableMapping

from torch import nn

from ..errors import one_line
from ..functional import has_batch_norm
from ..limits import MAX_BATCH
from ..models.spec import BuiltModel
from ..update import SharedUpdate
from .contract import ClientProtocol

__all__ = ["Explanation", "explain", "EXACT", "POSSIBLE", "APPROXIMATE", "NOT_ATTACKABLE"]

EXACT, POSSIBLE = "EXACT RECOVERY PREDICTED", "EXACT RECOVERY POSSIBLE"
APPROXIMATE, NOT_ATTACKABLE = "APPROXIMATE RECOVERY ONLY", "NOT ATTACKABLE AS SHARED"


@dataclass
class Explanation:
    """The verdict for one update and its reasons in words; ``analysis``: the analyser's
    verdict and per-attack reasons for the minibatch the client used (None if not run)."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    analysis: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "analysis": self.analysis}


def _protocol_reasons(update: SharedUpdate, protocol: ClientProtocol | None) -> tuple[list[str], bool, bool]:
    """Reasons from the protocol; whether an attack can run at all; whether the closed forms can."""
    p = protocol or ClientProtocol(lr=update.local_lr, epochs=update.local_epochs, local_steps=update.local_steps,
                                   batch_size=update.local_batch_size, num_examples=update.batch_size)
    reasons: list[str] = []
    runnable = closed = True
    n, b, k, lr = p.num_examples, p.batch_size, p.local_steps, p.lr
    if update.kind == "gradient":
        return [f"a gradient of {n} example(s) (FedSGD): what the closed forms and gradient matching invert"], True, True
    if n is None:
        reasons.append("the number of examples is unknown (no num-examples in the reply): an attack does not know "
                       "how many images to reconstruct")
        runnable = closed = False
    elif n > MAX_BATCH:
        reasons.append(f"{n:,} examples in one update, over the {MAX_BATCH:,} an attack reconstructs at once")
        runnable = closed = False
    if k is None:
        reasons.append("the number of local steps is unknown (neither the reply's metrics nor the train config give "
                       "epochs or steps with a minibatch size): the delta cannot be modelled")
        runnable = closed = False
    elif k == 1:
        reasons.append(f"one local SGD step on {n} example(s)" + (f" (lr {lr:g})" if lr else "") +
                       ": the delta is -lr times the gradient of that batch, so the gradient's verdict holds")
    else:
        epochs = f"{p.epochs} epoch(s) of {n} examples in minibatches of {b}, " if p.epochs and n and b else ""
        reasons.append(f"{k} local steps ({epochs}lr {lr if lr is None else f'{lr:g}'}): the delta sums {k} gradients "
                       "taken at different weights, which no closed form inverts; optimisation attacks must unroll "
                       "the steps and only approximate")
        closed = False
        if n and b and n % b:
            reasons.append(f"the last minibatch is partial ({n} % {b} = {n % b} examples): the unrolled attack assumes "
                           "full minibatches, another approximation")
    if lr is None:
        reasons.append("the learning rate is unknown (neither the reply's metrics nor the train config give it): the "
                       "local steps cannot be unrolled and a one-step delta cannot be turned into a gradient")
        runnable = closed = False
    for name, problem in (protocol.problems.items() if protocol else ()):
        reasons.append(f"{name}: {problem}")
    return reasons, runnable, closed


def _bn_reason(module: nn.Module, mode: str | None) -> list[str]:
    if not has_batch_norm(module):
        return []
    if mode == "eval":
        return ["eval-mode BatchNorm: the round's running statistics normalise every image independently"]
    return ["train-mode BatchNorm: each minibatch is normalised with its own statistics, which couples its images "
            "(the closed forms do not model it; gradient matching must reproduce the statistics)"]


def _analysis(built: BuiltModel, update: SharedUpdate, batch: int, labels_known: bool, numeric: bool,
              cache: MutableMapping[Any, Any] | None):
    """The analyser's report for ``batch`` at the update's weights (cached by batch when given a cache)."""
    from ..auto import analyze_update

    key = (batch, labels_known)
    if cache is not None and key in cache:
        return cache[key]
    report = analyze_update(built.module, update, num_classes=built.num_classes, labels_known=labels_known,
                            numeric=numeric, batch=batch, input_shape=tuple(built.input_shape), loss=built.loss)
    if cache is not None:
        cache[key] = report
    return report


def explain(update: SharedUpdate, model: BuiltModel, *, protocol: ClientProtocol | None = None,
            labels_known: bool = False, numeric: bool = True, cache: MutableMapping[Any, Any] | None = None,
            approximation: str | None = None) -> Explanation:
    """The verdict for ``update`` from ``model`` (a :class:`BuiltModel`; the weights at the
    round are the update's) under the ``protocol`` the client ran. ``cache``: a dict the
    caller keeps per round so the analyser runs once per minibatch size. ``approximation``:
    the update is attacked as ``protocol`` but is not exactly that (e.g. a sum of clients
    with different local steps): this reason replaces the protocol's, no closed form holds."""
    reasons, runnable, closed = _protocol_reasons(update, protocol)
    if approximation is not None:
        reasons, closed = [approximation, *reasons[1:]], False
    n = update.batch_size
    batch = min(update.local_batch_size or n or 1, n or 1) if update.kind == "delta" else (n or 1)
    analysis = None
    verdict = APPROXIMATE if runnable else NOT_ATTACKABLE
    if runnable:
        try:
            report = _analysis(model, update, batch, labels_known, numeric, cache)
        except Exception as error:  # noqa: BLE001 - the analyser may not support this model: say so, go on
            reasons.append(f"the analyser could not run on this model ({type(error).__name__}: {one_line(error, 200)})")
        else:
            analysis = {"verdict": report.verdict, "batch_size": batch,
                        "attacks": [a.to_json() for a in report.attacks]}
            exact = [a for a in report.attacks if a.exact]
            maybe = [a for a in report.attacks if a.applies and a.exact is None and a.attack != "optimisation"]
            if closed and exact:
                verdict = EXACT
                reasons += [f"{a.attack}: {a.reason}" for a in exact]
            elif closed and maybe:
                verdict = POSSIBLE
                reasons += [f"{a.attack}: {a.reason}" for a in maybe]
            else:
                prefix = "per step, " if not closed else ""
                reasons += [f"{prefix}{a.attack}: {a.reason}" for a in report.attacks
                            if a.attack != "optimisation" and not (closed is False and a.exact)][:4]
                if not closed and exact:
                    reasons.append(f"one step of this minibatch alone would be exactly invertible "
                                   f"({', '.join(a.attack for a in exact)}); the local steps prevent it")
    reasons += _bn_reason(model.module, update.mode)
    shared = sum(math.prod(s) for s in update.parameters.values())
    buffers = f" and {len(update.buffers)} buffer(s)" if update.buffers else ""
    labels = "labels not shared" if update.labels is None else "labels shared"
    reasons.append(f"shared: all {len(update.parameters)} parameter tensors ({shared:,} values){buffers}; {labels}")
    return Explanation(verdict, reasons, analysis)
