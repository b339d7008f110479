"""One reference page of every attack, defense and option, generated from the registries.

:func:`reference_markdown` walks the code itself (never a hand-kept list): the attack
registry (:data:`gradleak.attacks.ATTACKS`: name, class, family, paper, conditions of
validity, options and defaults, honest or malicious server, docstring), the defense
registry (:data:`gradleak.defenses.DEFENSES`: stage, paper, fields), the model zoo, the
:class:`~gradleak.threat.ThreatModel` fields (and the SoK's A-H threat models), the
:class:`~gradleak.client.ClientSetup` fields and the ``gradleak`` commands with their
options. ``gradleak reference --out docs/reference.md`` writes it; a test fails when the
committed page is stale. The CLI is given, not imported (``reference_markdown(gradleak.cli.app)``):
the ``gradleak reference`` command imports this package, so importing the CLI here would
be an import circle.
"""

from __future__ import annotations

import os
from typing import Any

from ._commands import cli_section
from ._methods import attack_sections, defense_sections
from ._settings import client_section, limits_section, model_section, threat_section

__all__ = ["reference_markdown", "write_reference", "REGENERATE"]

REGENERATE = "gradleak reference --out docs/reference.md"

_SECTIONS = (("Attacks", attack_sections), ("Defenses", defense_sections), ("Models", model_section),
             ("Threat model", threat_section), ("Client settings", client_section), ("Limits", limits_section),
             ("Command line", cli_section))


def reference_markdown(cli: Any) -> str:
    """The reference page as Markdown: every registered attack and defense, the model zoo,
    the threat model, the client settings and every command of ``cli`` (the typer app,
    :data:`gradleak.cli.app`), with their options."""
    lines = ["# gradleak reference", "",
             f"Generated from the code by `{REGENERATE}` (`gradleak.reference.reference_markdown(gradleak.cli.app)`); "
             "do not edit by hand. Attacks and defenses are listed in registry order.", ""]
    lines += [f"- [{title}](#{title.lower().replace(' ', '-')})" for title, _ in _SECTIONS]
    for _, section in _SECTIONS:
        lines += [""] + (section(cli) if section is cli_section else section())
    return "\n".join(lines).rstrip() + "\n"


def write_reference(path: str | os.PathLike, cli: Any) -> str:
    """Write the page of ``cli`` to ``path`` atomically; returns the Markdown written."""
    from .._io import atomic_write_text

    text = reference_markdown(cli)
    atomic_write_text(path, text)
    return text
