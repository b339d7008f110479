"""Leakage prediction from the architecture: which attacks apply and whether exact recovery is predicted."""

from .analyzer import AttackVerdict, LeakageReport, analyze, load_model_spec, report_table

__all__ = ["analyze", "LeakageReport", "AttackVerdict", "report_table", "load_model_spec"]
