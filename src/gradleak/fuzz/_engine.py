"""The campaign loop every fuzzed surface shares: feed each hostile input to the function under
test and count what happened, in the same terms for update files, weights files, model
factories, audit configs and ``train`` options.

An input may end in three ways only: it *loads* (and is then checked to be fully usable), it
is *refused* with a :class:`~gradleak.errors.GradleakError` whose message is one line, or it
*escapes* (anything else: each one a bug). A surface may also report side effects that must
never happen (a pickle payload that ran, a module imported without ``--allow-import``).
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import GradleakError

__all__ = ["Campaign", "Refused", "run_inputs"]


class Refused(Exception):
    """Raised by a surface's ``load`` for a refusal that is not an exception in this process
    (e.g. a command that exited with status 2 and printed ``message``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Campaign:
    """Counts of one fuzzing run. ``escaped``: inputs that raised something other than a
    GradleakError (each one a bug); ``multiline``: refusals whose message is not one line;
    ``unusable``: inputs that loaded but are not what they claim; ``side_effects``: things that
    must never happen (a pickle payload ran, code was imported without permission)."""

    surface: str = "updates"
    outcomes: Counter = field(default_factory=Counter)     # (kind, "loaded" | "refused") -> count
    reasons: Counter = field(default_factory=Counter)      # first words of the refusal -> count
    escaped: list[tuple[str, str, str]] = field(default_factory=list)
    unusable: list[tuple[str, str, str]] = field(default_factory=list)
    multiline: list[str] = field(default_factory=list)
    side_effects: list[str] = field(default_factory=list)
    slowest: float = 0.0          # CPU seconds of the costliest input (user + system, children included):
    slowest_input: str = ""       # unlike wall time, not inflated by other work on a loaded machine
    seconds: float = 0.0
    rss_growth_mb: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def total(self) -> int:
        """Every input fed: loaded, refused or escaped."""
        return sum(self.outcomes.values()) + len(self.escaped)

    @property
    def pickle_ran(self) -> bool:   # the update surface's name for its side effect
        return bool(self.side_effects)

    def count(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    @property
    def clean(self) -> bool:
        return not (self.escaped or self.multiline or self.unusable or self.side_effects)

    def summary(self) -> dict[str, Any]:
        """The figures docs/hardening.md reports per surface."""
        return {"surface": self.surface, "inputs": self.total, "refused": self.count("refused"),
                "loaded": self.count("loaded"), "escapes": len(self.escaped), "multiline": len(self.multiline),
                "unusable": len(self.unusable), "side_effects": len(self.side_effects),
                "slowest_ms": round(1000 * self.slowest), "slowest_input": self.slowest_input,
                "seconds": round(self.seconds, 1), "rss_growth_mb": round(self.rss_growth_mb),
                "peak_rss_mb": round(self.peak_rss_mb)}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _reason(message: str) -> str:
    return " ".join(message.split()[:5])


def run_inputs(surface: str, inputs: Iterable[tuple[str, Any]], load: Callable[[Any], Any],
               check: Callable[[Any], None] | None = None, describe: Callable[[Any], str] = str,
               progress: Callable[[int], None] | None = None) -> Campaign:
    """Feed each ``(kind, input)`` to ``load``; a result is checked with ``check`` (which raises
    when it is not usable). Refusal messages have ``describe(input)`` replaced by ``FILE`` so that
    the reasons group across inputs."""
    campaign = Campaign(surface)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for k, (kind, item) in enumerate(inputs):
        began = _cpu_seconds()
        try:
            result = load(item)
        except (GradleakError, Refused) as error:
            message = error.message if isinstance(error, Refused) else str(error)
            shown = describe(item)
            message = message.replace(shown, "FILE") if shown else message
            campaign.outcomes[(kind, "refused")] += 1
            campaign.reasons[_reason(message)] += 1
            if "\n" in message.strip() or "\r" in message:
                campaign.multiline.append(message[:300])
        except Exception as error:  # noqa: BLE001 - an escape is what we are looking for
            campaign.escaped.append((kind, describe(item), f"{type(error).__name__}: {error}"[:300]))
        else:
            campaign.outcomes[(kind, "loaded")] += 1
            if check is not None:
                try:
                    check(result)
                except Exception as error:  # noqa: BLE001 - a loaded input that is not usable: a loader bug
                    campaign.unusable.append((kind, describe(item), f"{type(error).__name__}: {error}"[:300]))
        took = _cpu_seconds() - began
        if took > campaign.slowest:
            campaign.slowest, campaign.slowest_input = took, f"{kind} {describe(item)}"[:200]
        if progress is not None:
            progress(k + 1)
    campaign.seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    campaign.rss_growth_mb, campaign.peak_rss_mb = (peak - rss) / 1024, peak / 1024
    return campaign


def print_campaign(campaign: Campaign, kinds: Iterable[str]) -> None:
    """The counts of one surface, as the long run prints them."""
    s = campaign.summary()
    print(f"[{campaign.surface}] {s['inputs']} inputs in {s['seconds']} s (slowest {s['slowest_ms']} ms: "
          f"{s['slowest_input']}; peak RSS {s['peak_rss_mb']} MB, grown by {s['rss_growth_mb']} MB)")
    for kind in kinds:
        print(f"  {kind:12s} loaded {campaign.outcomes[(kind, 'loaded')]:6d}   "
              f"refused {campaign.outcomes[(kind, 'refused')]:6d}")
    print(f"  escaped (not a GradleakError): {s['escapes']}; multi-line: {s['multiline']}; loaded but unusable: "
          f"{s['unusable']}; side effects: {s['side_effects']}")
    for kind, what, why in campaign.escaped[:10] + campaign.unusable[:10]:
        print(f"    {kind} {what}: {why}")
    for effect in campaign.side_effects[:10]:
        print(f"    side effect: {effect}")
    print("  most common refusals:")
    for reason, count in campaign.reasons.most_common(8):
        print(f"    {count:6d}  {reason}")
