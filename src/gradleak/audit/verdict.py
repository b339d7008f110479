"""The audit's verdict rule: when a reconstructed image counts as recognisable or partial."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ._checks import number

__all__ = ["VerdictRule"]


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
