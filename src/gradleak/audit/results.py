"""What an audit produces: the ``AuditResult`` of the whole grid, made of one ``CellResult``
per cell (``cell.py``, re-exported here).

Kept apart from the runner so that the report (``gradleak.report.audit``) can read results
without importing the code that computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cell import CellResult, defense_label, numbers, stored_record
from .config import AuditConfig

__all__ = ["CellResult", "AuditResult", "stored_record", "numbers", "defense_label"]


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
