"""What an audit produces: one ``CellResult`` per cell and the ``AuditResult`` of the whole grid.

Kept apart from the runner so that the report (``gradleak.report.audit``) can read results
without importing the code that computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import AuditConfig

__all__ = ["CellResult", "AuditResult"]


@dataclass
class CellResult:
    """One cell's outcome: ``status`` is done, not-applicable or error."""

    cell_id: str
    model: str
    attack: str
    defense_index: int
    defense: str
    batch_size: int
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    psnr: list[float | None] = field(default_factory=list)   # per attacked image; None: not recovered
    ssim: list[float | None] = field(default_factory=list)   # the same images (empty in cells stored before it)
    levels: dict[str, int] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    condition: str = ""          # not-applicable: the failed condition of the method, in few words
    seconds: float = 0.0
    server: str = "honest"       # the server the attack assumes: honest (but curious) or malicious
    threat_model: str = ""       # the SoK's threat-model letter A-H (gradleak.threat.sok_threat_model)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class AuditResult:
    out: Path
    config: AuditConfig
    cells: list[CellResult]
    utility: dict[int, dict[str, Any]]
    verdicts: list[dict[str, Any]]
    interrupted: bool = False
    baseline_psnr: float | None = None   # the attacked images' mean image against each: a no-information guess

    def __post_init__(self):
        self.out = Path(self.out)

    @property
    def report(self) -> Path:
        return self.out / "report.html"
