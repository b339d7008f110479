"""``--help`` is plain text a person reads: no escapes meant for HTML export."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradleak.cli import app

COMMANDS = [["demo"], ["capture"], ["attack"], ["report"], ["analyze"], ["audit"], ["train"], ["list"],
            ["reference"], ["study", "architectures"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_has_no_literal_escapes(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "\\[" not in result.output
    if command[0] in ("demo", "attack", "train"):
        assert "[default: " in result.output


def test_attack_help_lists_every_attacks_options():
    from gradleak.attacks import ATTACKS

    text = CliRunner().invoke(app, ["attack", "--help"]).output
    options = text[text.index("Attack options (-o key=value)"):]
    for name in ATTACKS:
        assert name in options, name
    for option in ("iterations", "restarts", "tv", "bins", "rank_tol", "pullback"):
        assert option in options, option
