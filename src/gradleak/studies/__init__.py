"""Studies: experiments from the literature reproduced end to end (attack + pictures + table)."""

from .architectures import ARCHITECTURES, ArchitectureResult, architecture_study

__all__ = ["ARCHITECTURES", "ArchitectureResult", "architecture_study"]
