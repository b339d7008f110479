"""The ``gradleak`` command: a thin layer over the public functions.

    gradleak demo                     the quick-start job (closed-form attack on real photos)
    gradleak capture ...              simulate a client and write its update file
    gradleak attack [UPDATE] ...      attack an update file, or freshly simulated clients
    gradleak report RUN_DIR           rebuild the pictures and HTML report of a run folder
    gradleak compare RUN [RUN ...]    several run folders side by side: a table, a figure, CSV
    gradleak analyze --model M        which attacks apply to an architecture, and why
    gradleak audit CONFIG             defenses x attacks grid, privacy-utility, verdicts
    gradleak study architectures      seed 004's DLG study across architectures
    gradleak train ...                train a zoo or user model (centralised or federated), with checkpoints
    gradleak list                     models, attacks and built-in data sets
    gradleak reference [--out FILE]   the reference page of every attack, defense and option (docs/reference.md)

Every command that names a model takes the same options (``--model`` zoo name or
``package.module:factory``, ``--model-option``, ``--weights``, ``--device``, ``--mode``,
``--dtype``, ``--seed``), parsed into one :class:`~gradleak.models.ModelSpec`.
"""

from __future__ import annotations

from . import analysis, audit, compare, reference, runs, study, train  # noqa: F401  (registers the commands)
from ._common import app

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
