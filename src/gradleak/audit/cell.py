"""One audit cell's outcome (:class:`CellResult`) and the helpers that store and name cells.

Kept apart from the grid's result (``results.py``) and from the config, so that the verdicts
(``verdict.py``, which the config imports for its ``VerdictRule``) can read cells without an
import circle: ``config -> verdict -> cell`` and ``results -> config, cell``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import from_json_float, to_jsonable

__all__ = ["CellResult", "stored_record", "numbers", "defense_label"]


def defense_label(stack: list[Any]) -> str:
    """A defense entry (a stack of defenses) as the report names it."""
    return " + ".join(d.label() for d in stack) or "none"


def stored_record(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record at ``path`` if it was made from exactly ``key`` (compared as written)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    written = json.loads(json.dumps(to_jsonable(key), default=str))
    return stored if isinstance(stored, dict) and stored.get("key") == written else None


def numbers(value: Any) -> Any:
    """Inverse of ``to_jsonable`` for the numbers of a stored record ("inf", "nan" -> float)."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return from_json_float(value)
    return value


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
    residual: list[float | None] = field(default_factory=list)   # per update: the truth-free update residual
    certified: list[bool] = field(default_factory=list)          # per update: certified exact by its residual
    update_images: list[int] = field(default_factory=list)       # per update: how many of the images it holds

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))
