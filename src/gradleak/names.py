"""Names that reach code: normalised and checked in one place, before anything is imported.

A model is named by a zoo name (``lenet``) or by the user's own factory
(``package.module:factory``); attacks and defenses by registry names. Names arrive from the
command line, from audit configs someone else may have written, from update files. Every
one of them passes :func:`model_name` (or :func:`registry_name`) first, and every later
check and every import sees only what it returns, so a name cannot be one thing when it is
checked and another when it is used:

- surrounding whitespace is removed (``" os:getcwd"`` *is* ``os:getcwd``, and is therefore
  subject to ``--allow-import`` like any factory);
- Unicode compatibility forms are folded (NFKC: a full-width ``ｏｓ：ｇｅｔｃｗｄ`` is
  ``os:getcwd``), and what is still not printable ASCII afterwards is refused with the
  character named (a Cyrillic ``о`` that only looks like ``o``);
- a factory is exactly ``identifier(.identifier)*:identifier`` (``re.fullmatch``: a trailing
  newline, a second ``:``, a path or an empty part is refused);
- whether a file may name a factory at all is decided by :func:`check_import_allowed`.

Attack and defense names from configs pass :func:`normalize` too.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable

from .errors import ConfigError
from .limits import short_repr

__all__ = ["MAX_NAME", "FACTORY_PATTERN", "normalize", "model_name", "is_factory", "is_hf_folder", "factory_parts",
           "check_import_allowed"]

MAX_NAME = 200
FACTORY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def normalize(value: Any, where: str) -> str:
    """``value`` as a name: a string of at most :data:`MAX_NAME` characters, NFKC-folded, without
    surrounding whitespace, printable ASCII with no space inside; else one ConfigError line."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a name must be a string, got {short_repr(value)}")
    if len(value) > MAX_NAME:
        raise ConfigError(f"{where}: a name of {len(value):,} characters is longer than the limit of {MAX_NAME}")
    text = unicodedata.normalize("NFKC", value).strip()
    if not text:
        raise ConfigError(f"{where}: the name is empty")
    if not _PRINTABLE_ASCII.fullmatch(text):
        bad = next(c for c in text if not ("\x21" <= c <= "\x7e"))
        what = unicodedata.name(bad, "a control character") if bad.isprintable() or bad == " " else "a control character"
        raise ConfigError(f"{where}: {short_repr(value)} contains U+{ord(bad):04X} ({what}); names are printable "
                          "ASCII without spaces (a look-alike character is not the letter it resembles)")
    return text


def is_hf_folder(name: str) -> bool:
    """``name`` is ``hf:FOLDER``: a local ``save_pretrained`` folder of a text model, read as data
    (safetensors weights, config.json), never imported (:func:`gradleak.text.models.hf_model`)."""
    return isinstance(name, str) and name.startswith("hf:") and len(name) > 3


def is_factory(name: str) -> bool:
    """``name`` (already normalised) is ``package.module:factory`` (``hf:FOLDER`` is not, even
    when the folder's name looks like an identifier)."""
    return not is_hf_folder(name) and FACTORY_PATTERN.fullmatch(name) is not None


def factory_parts(name: str) -> tuple[str, str]:
    """(module, attribute) of a normalised factory name."""
    if not is_factory(name):
        raise ConfigError(f"{short_repr(name)} is not package.module:factory")
    module, _, attr = name.partition(":")
    return module, attr


def model_name(value: Any, where: str = "model", known: Iterable[str] = ()) -> str:
    """The normalised model name: one of the ``known`` zoo names (the caller passes
    :data:`gradleak.models.MODELS`) or a factory."""
    known = list(known)
    text = normalize(value, where)
    if text in known or is_factory(text) or is_hf_folder(text):
        return text
    hint = ""
    if ":" in text:
        hint = " (a factory is package.module:factory: identifiers separated by dots, one ':', one function name)"
    zoo = f" ({', '.join(known)})" if known else ""
    raise ConfigError(f"{where}: unknown model {short_repr(text)}; give a zoo name{zoo} or "
                      f"package.module:factory{hint}")


def check_import_allowed(name: Any, allow: Iterable[str], where: str) -> None:
    """A factory named by a file is imported only when the user allowed its module (or a
    package above it) on the command line. ``name`` is normalised here first, so the check
    sees the name that would be imported; names that are not factories pass."""
    if not isinstance(name, str):
        return
    text = normalize(name, where)
    if not is_factory(text):
        return
    module, _ = factory_parts(text)
    allowed = [normalize(a, "--allow-import") for a in allow]
    if not any(module == a or module.startswith(a + ".") for a in allowed):
        raise ConfigError(f"{where}: {text!r} would import code named by the config file; gradleak imports it only "
                          f"when you allow it: --allow-import {module}")
