"""The generated reference page: every registered attack and defense, the model zoo, the
threat model, the client settings and every command appear with their options; the committed
docs/reference.md is what the code generates now; an attack registered later appears too."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gradleak import ClientSetup, threat
from gradleak.attacks import ATTACKS, Attack, MaliciousAttack, MatchingConfig, Reconstruction, register_attack
from gradleak.cli import app
from gradleak.defenses import DEFENSES
from gradleak.models import MODELS
from gradleak.reference import REGENERATE, reference_markdown
from gradleak.reference._commands import option_name, walk

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def sections(markdown: str) -> dict[str, str]:
    """Heading text (without the #s) -> the lines under it, up to the next heading."""
    found: dict[str, list[str]] = {}
    current = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            current = line.lstrip("#").strip()
            found[current] = []
        else:
            found.setdefault(current, []).append(line)
    return {heading: "\n".join(lines) for heading, lines in found.items()}


@pytest.fixture(scope="module")
def page() -> dict[str, str]:
    return sections(reference_markdown(app))


def keyword_options(cls) -> list[str]:
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "model", "threat") and p.kind is not p.VAR_POSITIONAL]


def test_every_attack_appears_with_its_paper_conditions_server_and_options(page):
    engine = page["Gradient-matching options"]
    for field in dataclasses.fields(MatchingConfig):
        assert f"| `{field.name}` |" in engine, field.name
    assert len(ATTACKS) >= 13
    for name, cls in ATTACKS.items():
        text = page[f"attack `{name}`"]
        assert cls.paper in text and cls.conditions in text and f"`{cls.__module__}.{cls.__qualname__}`" in text
        server = next(line for line in text.splitlines() if line.startswith("- server:"))
        assert ("malicious" in server) == issubclass(cls, MaliciousAttack), name
        if isinstance(getattr(cls, "preset", None), MatchingConfig):
            base = MatchingConfig()
            changed = [f.name for f in dataclasses.fields(MatchingConfig)
                       if getattr(cls.preset, f.name) != getattr(base, f.name)]
            for field in changed:
                assert f"`{field}={getattr(cls.preset, field)!r}`" in text, (name, field)
            assert f"`{name}`" in engine.splitlines()[next(i for i, l in enumerate(engine.splitlines())
                                                              if l.startswith("| option"))]
        else:
            for option in keyword_options(cls):
                assert f"`{option}`" in text or f"`**{option}`" in text, (name, option)


def test_every_defense_appears_with_its_stage_paper_and_fields(page):
    for name, cls in DEFENSES.items():
        text = page[f"defense `{name}`"]
        assert f"- stage: `{cls.stage}`" in text and cls.paper in text
        for field in dataclasses.fields(cls):
            default = "required" if field.default is dataclasses.MISSING else f"`{field.default!r}`"
            assert f"| `{field.name}` |" in text and default in text, (name, field.name)
        if not dataclasses.fields(cls):
            assert "Options: none." in text


def test_models_threat_model_client_settings_and_sok_appear(page):
    models = page["Models"]
    for name, entry in MODELS.items():
        assert f"| `{name}` |" in models and entry.description in models.replace("\\|", "|")
    for cls, heading in ((threat.ThreatModel, "Threat model"), (ClientSetup, "Client settings")):
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in page[heading], field.name
    sok = getattr(threat, "SOK_THREAT_MODELS", None)
    assert ("SoK threat models A-H" in page) == bool(sok)
    for letter, (name, _) in (sok or {}).items():
        assert f"| `{letter}` | {name} |" in page["SoK threat models A-H"]


def test_every_command_appears_with_every_option(page):
    commands = list(walk(typer.main.get_command(app)))
    assert {"gradleak attack", "gradleak audit", "gradleak reference", "gradleak study architectures"} <= {
        path for path, _ in commands}
    for path, command in commands:
        text = page[f"`{path}`"]
        for param in command.params:
            assert f"`{option_name(param)}`" in text, (path, param.name)
            for opt in param.opts:
                assert opt in text or param.param_type_name == "argument"


def test_committed_page_is_current():
    expected = reference_markdown(app)
    actual = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/reference.md", "generated", n=0))[:12])
        pytest.fail(f"docs/reference.md is stale; regenerate it with `{REGENERATE}` and commit it.\n{diff}")


def test_an_attack_registered_later_appears_and_leaves_no_trace():
    @register_attack
    class Echo(MaliciousAttack):
        """A test's attack that echoes nothing.

        Second paragraph: not on the page."""

        name = "test-echo"
        paper = "Nobody 2099, Echoes"
        conditions = "never in production"

        def __init__(self, model, threat=None, *, echoes: int = 3, loud: bool = False):
            super().__init__(model, threat)

        def _reconstruct(self, update):
            return Reconstruction(images=None)

    try:
        text = sections(reference_markdown(app))["attack `test-echo`"]
        assert "A test's attack that echoes nothing." in text and "Second paragraph" not in text
        assert "| `echoes` | `int` | `3` |" in text and "| `loud` | `bool` | `False` |" in text
        assert "Nobody 2099, Echoes" in text and "never in production" in text and "- server: malicious" in text
    finally:
        ATTACKS.pop("test-echo", None)
    assert "test-echo" not in reference_markdown(app) and "test-echo" not in ATTACKS
    assert issubclass(Echo, Attack)


def test_cli_prints_the_page_or_writes_it(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["reference"], catch_exceptions=False)
    assert printed.exit_code == 0 and printed.output == reference_markdown(app)
    out = tmp_path / "ref.md"
    written = runner.invoke(app, ["reference", "--out", str(out)], catch_exceptions=False)
    assert written.exit_code == 0 and out.read_text(encoding="utf-8") == reference_markdown(app)
    blocked = runner.invoke(app, ["reference", "--out", str(out / "x.md")], catch_exceptions=False)
    assert blocked.exit_code == 2 and "is a file" in blocked.output and "Traceback" not in blocked.output
