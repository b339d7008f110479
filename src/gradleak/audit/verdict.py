"""The audit's verdicts: when a reconstructed image counts as recognisable or partial
(:class:`VerdictRule`), and the sentence per (model, defense, batch size) that says what an
honest-but-curious and a malicious server get (:func:`audit_verdicts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ._checks import number
from .cell import CellResult

__all__ = ["VerdictRule", "audit_verdicts", "cell_level"]


@dataclass(frozen=True)
class VerdictRule:
    """Per image: PSNR >= ``recognisable_psnr`` is a recognisable reconstruction, >= ``partial_psnr``
    partial structure. Optionally SSIM too: an image then counts at the higher of the two levels.

    PSNR punishes noise that the eye sees through (DLG through variance-1e-4 noise: 12-21 dB,
    every photo recognisable; ``docs/defenses.md``), so ``recognisable_ssim`` / ``partial_ssim``
    let a structural criterion raise such images; they are off (None) by default."""

    recognisable_psnr: float = 18.0
    partial_psnr: float = 14.0
    recognisable_ssim: float | None = None
    partial_ssim: float | None = None

    def __post_init__(self):
        if number("verdict: partial_psnr", self.partial_psnr) > number("verdict: recognisable_psnr",
                                                                        self.recognisable_psnr):
            raise ConfigError(f"verdict: partial_psnr ({self.partial_psnr}) must not exceed recognisable_psnr "
                              f"({self.recognisable_psnr})")
        for name in ("recognisable_ssim", "partial_ssim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise ConfigError(f"verdict: {name} must be in (0, 1] (SSIM), got {value!r}")
        if None not in (self.recognisable_ssim, self.partial_ssim) and self.partial_ssim > self.recognisable_ssim:
            raise ConfigError(f"verdict: partial_ssim ({self.partial_ssim}) must not exceed recognisable_ssim "
                              f"({self.recognisable_ssim})")

    def level(self, psnr: float | None, ssim: float | None = None) -> str:
        """"recognisable", "partial" or "none" for one image (None: not recovered)."""
        ranks = [0]
        if psnr is not None and psnr == psnr:
            ranks.append(2 if psnr >= self.recognisable_psnr else 1 if psnr >= self.partial_psnr else 0)
        if ssim is not None and ssim == ssim:
            ranks.append(2 if self.recognisable_ssim is not None and ssim >= self.recognisable_ssim else
                         1 if self.partial_ssim is not None and ssim >= self.partial_ssim else 0)
        return ("none", "partial", "recognisable")[max(ranks)]

    def describe(self, level: str = "recognisable") -> str:
        """The criterion in words: ``PSNR >= 18 dB`` or ``PSNR >= 18 dB or SSIM >= 0.5``."""
        psnr, ssim = ((self.recognisable_psnr, self.recognisable_ssim) if level == "recognisable" else
                      (self.partial_psnr, self.partial_ssim))
        return f"PSNR >= {psnr:g} dB" + (f" or SSIM >= {ssim:g}" if ssim is not None else "")


def cell_level(cell: CellResult) -> str:
    """One cell's verdict by the per-image rule: ``leaks`` when any image is recognisable,
    ``partial`` when any shows partial structure, ``protected`` when measured and neither,
    ``not-measured`` otherwise. The verdict sentences, the matrix and the privacy-utility plot
    all use this, so they cannot disagree."""
    if cell.status != "done":
        return "not-measured"
    if cell.levels.get("recognisable", 0) > 0:
        return "leaks"
    return "partial" if cell.levels.get("partial", 0) > 0 else "protected"


def _judge(members: list[CellResult], rule: VerdictRule) -> tuple[str, str]:
    """(level, sentence) for the cells of one (model, defense, batch size) and one kind of server."""
    recognisable = [c for c in members if cell_level(c) == "leaks"]
    partial = [c for c in members if cell_level(c) == "partial"]

    def describe(c) -> str:
        return (f"{c.attack} ({c.levels.get('recognisable', 0)} of {len(c.psnr)} images with "
                f"{rule.describe()}; mean PSNR {c.summary.get('psnr_mean', float('nan')):.1f} dB)")

    if recognisable:
        return "leaks", (f"{'; '.join(describe(c) for c in recognisable)} still recover"
                         f"{'s' if len(recognisable) == 1 else ''} recognisable images.")
    if partial:
        return "partial", (f"no attack recovers a recognisable image; {', '.join(c.attack for c in partial)} "
                           f"recover{'s' if len(partial) == 1 else ''} partial structure ({rule.describe('partial')}).")
    scored = [c for c in members if c.status == "done" and c.summary.get("psnr_mean") is not None]
    best = max(scored, key=lambda c: c.summary["psnr_mean"], default=None)
    others = [c for c in members if c is not best and c.status != "done"]
    text = (f"no attack recovers recognisable images (best mean PSNR {best.summary['psnr_mean']:.1f} dB, "
            f"{best.attack})." if best else "no attack reconstructed images.")
    for status, words in (("not-applicable", "Not applicable"), ("error", "Failed")):
        failed = [c for c in others if c.status == status]
        if failed:
            text += f" {words}: " + "; ".join(
                f"{c.attack} (valid only when: {c.condition})" if c.condition else f"{c.attack} ({c.message})"
                for c in failed) + "."
    return ("protected" if best else "not-measured"), text


def _threat_models(cells: list[CellResult]) -> str:
    letters = sorted({c.threat_model for c in cells if c.threat_model})
    return f" (SoK {'/'.join(letters)})" if letters else ""


def audit_verdicts(cells: list[CellResult], rule: VerdictRule) -> list[dict[str, Any]]:
    """Per (model, defense, batch size): which attacks still recover recognisable images, in
    words; what an honest-but-curious server gets, then (when the grid has malicious-server
    attacks) what a malicious one gets."""
    groups: dict[tuple, list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.defense_index, cell.batch_size), []).append(cell)
    verdicts = []
    for (model, index, batch), members in groups.items():
        honest = [c for c in members if c.server != "malicious"]
        malicious = [c for c in members if c.server == "malicious"]
        text = f"{model}, batch {batch}, defense {members[0].defense}: "
        level, malicious_level = "not-measured", None
        if honest:
            level, sentence = _judge(honest, rule)
            text += (f"an honest-but-curious server{_threat_models(honest)}: " if malicious else "") + sentence
        if malicious:
            malicious_level, sentence = _judge(malicious, rule)
            text += (" " if honest else "") + f"A malicious server{_threat_models(malicious)}: {sentence}"
        labels = [c for c in members if c.status == "done" and c.summary.get("label_accuracy") == 1.0]
        if labels:
            text += f" Labels fully recovered by {', '.join(c.attack for c in labels)}."
        verdicts.append({"model": model, "defense_index": index, "defense": members[0].defense, "batch_size": batch,
                         "level": level if honest else malicious_level, "malicious_level": malicious_level,
                         "text": text})
    return verdicts
