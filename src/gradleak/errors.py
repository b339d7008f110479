"""The exceptions gradleak raises. Every message names the problem: which parameter,
which entry, which shape, which condition of a method failed."""

from __future__ import annotations

__all__ = [
    "GradleakError",
    "UpdateFileError",
    "DataError",
    "ConfigError",
    "AttackNotApplicable",
    "OutputError",
    "one_line",
]


def one_line(text: object, limit: int = 500) -> str:
    """``str(text)`` on one line (every run of whitespace, newlines included, becomes one
    space), cut to ``limit`` characters: how an error from a library is quoted in ours."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class GradleakError(Exception):
    """Base class of every error gradleak raises on purpose."""


class UpdateFileError(GradleakError, ValueError):
    """An update file (or in-memory update) is malformed, tampered with, or does not fit the model."""


class DataError(GradleakError, ValueError):
    """A data path is missing, or a file is not in the format it claims."""


class ConfigError(GradleakError, ValueError):
    """A parameter value is out of range or inconsistent with another."""


class OutputError(GradleakError, OSError):
    """A result cannot be written where it was asked to go (not a folder, read-only, disk full...)."""


class AttackNotApplicable(GradleakError):
    """The conditions under which an attack is valid do not hold for this update.

    ``condition`` states the failed condition in words, so reports can show it.
    """

    def __init__(self, message: str, *, condition: str | None = None):
        super().__init__(message)
        self.condition = condition or message
