"""The leakage audit: models x attacks x defenses x batch sizes on real images, with the
accuracy each defense costs, verdicts in words, and one report (``gradleak audit CONFIG``)."""

from .config import AttackChoice, AuditConfig, ModelChoice, UtilityConfig, VerdictRule, load_audit_config  # noqa: F401
from .results import AuditResult, CellResult  # noqa: F401
from .runner import CellSpec, audit_cells, run_audit  # noqa: F401

__all__ = ["AuditConfig", "ModelChoice", "AttackChoice", "UtilityConfig", "VerdictRule", "load_audit_config",
           "AuditResult", "CellResult", "CellSpec", "audit_cells", "run_audit"]
