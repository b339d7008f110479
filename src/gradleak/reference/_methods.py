"""The attack and defense sections of the reference page, read from their registries.

Attacks: :data:`gradleak.attacks.ATTACKS`; each class's ``name``, ``paper``, ``conditions``,
module (its family), ``__init__`` keyword options, whether it is a malicious-server attack
(:class:`~gradleak.attacks.malicious.MaliciousAttack`) and its docstring. The presets of the
gradient-matching engine take every :class:`~gradleak.attacks.MatchingConfig` field; their
options are one table (a column per preset, its overrides filled in). Defenses:
:data:`gradleak.defenses.DEFENSES`, each a dataclass whose fields are its options.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ._format import anchor, code, dataclass_rows, default_text, field_notes, first_paragraph, table, type_text

__all__ = ["attack_sections", "defense_sections", "attack_heading", "defense_heading", "attack_options"]

_SKIP = ("self", "model", "threat")


def attack_heading(name: str) -> str:
    return f"attack `{name}`"


def defense_heading(name: str) -> str:
    return f"defense `{name}`"


def _preset(cls: type) -> Any:
    """The class's :class:`MatchingConfig` preset, or None for an attack outside the engine."""
    from ..attacks import MatchingConfig

    preset = getattr(cls, "preset", None)
    return preset if isinstance(preset, MatchingConfig) else None


def _is_malicious(cls: type) -> bool:
    from ..attacks import MaliciousAttack

    return issubclass(cls, MaliciousAttack)


def preset_overrides(cls: type) -> dict[str, Any]:
    """The MatchingConfig fields a preset sets differently from MatchingConfig's defaults."""
    from ..attacks import MatchingConfig

    base, preset = MatchingConfig(), _preset(cls)
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(MatchingConfig)
            if getattr(preset, f.name) != getattr(base, f.name)}


def attack_options(cls: type) -> list[tuple[str, str, str]]:
    """(option, type, default) of an attack outside the engine, from its ``__init__``."""
    rows = []
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _SKIP or param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.VAR_KEYWORD:
            rows.append((code(f"**{param.name}"), "", "further keyword options, passed on (see the class docstring)"))
            continue
        rows.append((code(param.name), type_text(param.annotation, param.default), default_text(param.default)))
    return rows


def own_options(cls: type) -> list[tuple[str, str, str]]:
    """(option, type, default) of an engine preset's own keyword options (LAMP's), beyond the
    engine's fields."""
    return [row for row in attack_options(cls) if row[0] not in (code("config"), code("**overrides"))]


def option_lines() -> list[str]:
    """Every attack's ``-o key=value`` options as plain text, one line per attack (the engine's
    presets share one line): for ``gradleak attack --help``."""
    import dataclasses as dc

    from ..attacks import ATTACKS, GradientMatching, MatchingConfig

    engine = sorted(name for name, cls in ATTACKS.items() if issubclass(cls, GradientMatching))
    lines = [f"{', '.join(engine)}: " + ", ".join(f.name for f in dc.fields(MatchingConfig))]
    lines += [f"{name} also: {', '.join(row[0].strip('`') for row in own_options(ATTACKS[name]))}"
              for name in engine if own_options(ATTACKS[name])]
    for name, cls in sorted(ATTACKS.items()):
        if name in engine:
            continue
        names = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                 if p.name not in _SKIP and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        lines.append(f"{name}: {', '.join(names) or '(none)'}")
    return lines


def _facts(cls: type) -> list[str]:
    from ..attacks import MaliciousAttack

    family = cls.__module__.rsplit(".", 1)[-1]
    server = (f"malicious: changes the model it sends (subclass of `{MaliciousAttack.__name__}`; "
              f"needs `ThreatModel(server=\"malicious\")`)") if _is_malicious(cls) else "honest but curious"
    rows = [("class", code(f"{cls.__module__}.{cls.__qualname__}")), ("family", code(family)),
            ("paper", cls.paper), ("valid when", cls.conditions), ("server", server)]
    uses = [what for flag, what in (("surrogate_data", "public data (images, text) from the clients' distribution"),
                                    ("training_details", "the clients' local training schedule"))
            if getattr(cls, flag, False) is True]
    if uses:
        rows.append(("also uses", "; ".join(uses)))
    return [f"- {key}: {value}" for key, value in rows]


def _engine_table(presets: dict[str, type]) -> list[str]:
    """Every MatchingConfig field: type, default, each preset's value where it differs, the
    comment in the source."""
    from ..attacks import MatchingConfig

    notes = field_notes(MatchingConfig)
    choices = getattr(inspect.getmodule(MatchingConfig), "_CHOICES", {})  # the values __post_init__ accepts
    for field, values in choices.items():
        accepted = "one of " + ", ".join(code(repr(v)) for v in values)
        notes[field] = f"{notes[field]}; {accepted}" if notes.get(field) else accepted
    overrides = {name: preset_overrides(cls) for name, cls in presets.items()}
    header = ["option", "type", "default"] + [code(name) for name in presets] + ["what it sets"]
    rows = []
    for name, kind, default, _ in dataclass_rows(MatchingConfig):
        field = name.strip("`")
        values = [default_text(overrides[p][field]) if field in overrides[p] else "" for p in presets]
        rows.append([name, kind, default, *values, notes.get(field, "")])
    return table(header, rows)


def attack_sections() -> list[str]:
    """The attacks: a summary table, the gradient-matching options, one section per attack."""
    from ..attacks import ATTACKS, MatchingConfig

    presets = {name: cls for name, cls in ATTACKS.items() if _preset(cls) is not None}
    lines = ["## Attacks", "",
             f"{len(ATTACKS)} attacks in `gradleak.attacks.ATTACKS`, by name as `gradleak attack --attack NAME` and "
             "the audit configs take them; options as `--option key=value` or keyword arguments "
             "(`get_attack(NAME)(model, threat, **options)`).", ""]
    lines += table(["name", "family", "server", "paper"], [
        (f"[`{name}`](#{anchor(attack_heading(name))})", code(cls.__module__.rsplit(".", 1)[-1]),
         "malicious" if _is_malicious(cls) else "honest", cls.paper) for name, cls in ATTACKS.items()])
    if presets:
        lines += ["", "### Gradient-matching options", "",
                  f"Every attack of the one gradient-matching engine ({', '.join(code(p) for p in presets)}) takes "
                  f"every field of `{MatchingConfig.__module__}.{MatchingConfig.__name__}` as an option; a preset "
                  "only changes defaults (a column shows a preset's value where it differs; empty: the default). "
                  + first_paragraph(MatchingConfig), ""]
        lines += _engine_table(presets)
    for name, cls in ATTACKS.items():
        lines += ["", f"### {attack_heading(name)}", ""]
        doc = first_paragraph(cls)
        if doc:
            lines += [doc, ""]
        lines += _facts(cls) + [""]
        if _preset(cls) is not None:
            sets = ", ".join(f"`{key}={value!r}`" for key, value in preset_overrides(cls).items())
            lines.append(f"Options: every [gradient-matching option](#gradient-matching-options); "
                         f"this preset sets {sets or 'none (the defaults)'}.")
            own = own_options(cls)
            if own:
                lines += ["", "Its own options:", ""] + table(["option", "type", "default"], own)
            continue
        options = attack_options(cls)
        lines += table(["option", "type", "default"], options) if options else ["Options: none."]
    return lines


def defense_sections() -> list[str]:
    """The defenses: a summary table, one section per defense with its fields."""
    from ..defenses import DEFENSES, STAGES

    lines = ["## Defenses", "",
             f"{len(DEFENSES)} defenses in `gradleak.defenses.DEFENSES`, each acting at one stage "
             f"({', '.join(code(s) for s in STAGES)}); named as `name:key=value,key=value` by "
             "`gradleak attack --defense`, the audit configs and `make_defense`.", ""]
    lines += table(["name", "stage", "paper"], [
        (f"[`{name}`](#{anchor(defense_heading(name))})", code(cls.stage), cls.paper)
        for name, cls in DEFENSES.items()])
    for name, cls in DEFENSES.items():
        lines += ["", f"### {defense_heading(name)}", ""]
        doc = first_paragraph(cls)
        if doc:
            lines += [doc, ""]
        lines += [f"- class: {code(f'{cls.__module__}.{cls.__qualname__}')}", f"- stage: {code(cls.stage)}",
                  f"- paper: {cls.paper}", ""]
        rows = dataclass_rows(cls) if dataclasses.is_dataclass(cls) else []
        lines += table(["option", "type", "default", "what it sets"], rows) if rows else ["Options: none."]
    return lines
