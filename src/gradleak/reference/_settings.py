"""The settings sections of the reference page: the model zoo, the threat model (and the
SoK's A-H vocabulary where :mod:`gradleak.threat` defines it) and the client settings."""

from __future__ import annotations

import inspect

from ._format import code, dataclass_rows, default_text, paragraphs, own_doc, table

__all__ = ["model_section", "threat_section", "client_section", "limits_section"]

_BUILD_ARGS = ("shape", "num_classes")


def _model_options(build) -> str:
    params = [p for p in inspect.signature(build).parameters.values() if p.name not in _BUILD_ARGS]
    return ", ".join(f"{p.name}={default_text(p.default).strip('`')}" if p.default is not p.empty else p.name
                     for p in params)


def model_section() -> list[str]:
    """The zoo by name: its options (``--model-option key=value``) with defaults, its loss."""
    from ..models import MODELS

    lines = ["## Models", "",
             f"{len(MODELS)} architectures in `gradleak.models.MODELS`, named by `--model NAME` (options: "
             "`--model-option key=value`) or `ModelSpec(NAME, options)`. Any `nn.Module` works too, as "
             "`--model package.module:factory`.", ""]
    lines += table(["name", "options (defaults)", "loss", "description"], [
        (code(name), code(_model_options(entry.build)) if _model_options(entry.build) else "", code(entry.loss),
         entry.description) for name, entry in MODELS.items()])
    return lines


def _sok_lines() -> list[str]:
    from .. import threat

    vocabulary = getattr(threat, "SOK_THREAT_MODELS", None)
    if not vocabulary:
        return []
    lines = ["", "### SoK threat models A-H", ""]
    intro = own_doc(threat).split("\n\n")
    sok = [p for p in paragraphs("\n\n".join(intro)) if "SoK" in p]
    lines += ([sok[0], ""] if sok else [])
    return lines + table(["id", "name", "the attacker"], [(code(k), name, what) for k, (name, what) in vocabulary.items()])


def threat_section() -> list[str]:
    """``ThreatModel``'s fields (what the attacker is granted), then the SoK vocabulary if defined."""
    from ..threat import ThreatModel

    lines = ["## Threat model", "", f"`{ThreatModel.__module__}.ThreatModel`: {paragraphs(own_doc(ThreatModel))[0]}",
             ""]
    lines += table(["field", "type", "default", "meaning"], dataclass_rows(ThreatModel))
    return lines + _sok_lines()


def client_section() -> list[str]:
    """``ClientSetup``'s fields (``--client key=value``), its docstring as the explanation."""
    from ..client import ClientSetup

    lines = ["## Client settings", "",
             "`gradleak.ClientSetup` (`--client key=value` on the command line, `client:` in audit configs).", ""]
    for paragraph in paragraphs(own_doc(ClientSetup)):
        lines += [paragraph, ""]
    return lines + table(["field", "type", "default", "meaning"], dataclass_rows(ClientSetup))


def limits_section() -> list[str]:
    """The one table of limits (:data:`gradleak.limits.LIMITS`) every command and config shares."""
    from ..limits import LIMITS, MAX_BATCH_ELEMENTS

    lines = ["## Limits", "",
             "`gradleak.limits.LIMITS`: one bound per quantity, shared by every command's option, audit-config "
             f"key and function that names it. Images are also bounded by their values: n x C x side^2 <= "
             f"{MAX_BATCH_ELEMENTS:,} before any is resized. The rules for untrusted input: `docs/hardening.md`.", ""]
    return lines + table(["quantity", "range", "where"], [(code(k), f"{v.low:,}..{v.high:,}", v.what)
                                                          for k, v in LIMITS.items()])
