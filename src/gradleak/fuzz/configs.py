"""Hostile audit configs: names in every form, and values no audit needs.

An audit config may come from someone else. :func:`~gradleak.audit.load_audit_config` must
load a config whose every model builds, or refuse it in one line, and must never import a
module the user did not allow with ``--allow-import``, however the config spells its name.
Each input is a YAML or TOML file built from a valid config with one kind of edit:

- ``names``: model names as plain strings or mappings, in ``models``, ``attacks[k].models`` or
  ``utility.model``, spelled with surrounding or inner whitespace, newlines, full-width and
  Cyrillic look-alikes, zero-width characters, extra colons, paths, case changes, non-strings;
  among them a module that records its own import and is never allowed;
- ``values``: sizes, counts, seeds, options, weights paths and attack or defense names out of
  range or of the wrong type;
- ``structure``: missing or unknown keys, wrong containers, deep nesting, YAML aliases;
- ``valid``: well-formed configs naming zoo models and the allowed factory (these must load,
  and every model must build).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import yaml

from ._engine import Campaign, run_inputs

__all__ = ["KINDS", "hostile_configs", "run_configs"]

KINDS = ("names", "values", "structure", "valid")
EVIL, ALLOWED = "fuzz_evil_module", "fuzz_allowed_module"
MARKER = "fuzz-evil-imported"

_EVIL_SOURCE = '''
import os, pathlib
pathlib.Path(os.environ["GRADLEAK_FUZZ_MARKER"]).write_text("imported")

def factory(**options):
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
'''
_ALLOWED_SOURCE = '''
import torch

def factory(width=8):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, int(width)), torch.nn.ReLU(),
                               torch.nn.Linear(int(width), 10))
'''
_DRESS = [lambda s: " " + s, lambda s: s + " ", lambda s: "\t" + s, lambda s: s + "\n", lambda s: "\u3000" + s,
          lambda s: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s),  # full width
          lambda s: s.replace("o", "\u043e", 1), lambda s: s.replace(":", "\u200b:", 1), lambda s: s.replace(":", "::"),
          lambda s: s + ":x", lambda s: "../" + s, lambda s: s.upper(), lambda s: s.replace(":", "."),
          lambda s: s.replace("_", "-"), lambda s: s * 40, lambda s: s, lambda s: "\ufeff" + s,
          lambda s: s.replace(":", "\uff1a")]
_NOT_STRINGS = [None, 3, 2.5, True, [], {}, ["lenet"], {"name": None}, {"name": 3}, {"name": ["lenet"]}]


def _base(rng: random.Random) -> dict[str, Any]:
    model = rng.choice(["mlp", "lenet", f"{ALLOWED}:factory"])
    data = "photos" if model.startswith(ALLOWED) else rng.choice(["photos", "digits", "faces"])  # 3 channels
    return {"name": "fuzz", "data": {"name": data, "n": rng.choice([1, 2]), "size": 8}, "models": [model],
            "attacks": ["fc-bias"], "defenses": ["none"], "utility": False}


def _name(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rng.choice(_NOT_STRINGS)
    target = rng.choice([f"{EVIL}:factory", f"{EVIL}:factory", f"{ALLOWED}:factory", "lenet", "mlp",
                         f"{EVIL}.sub:factory", "os:getcwd"])
    return rng.choice(_DRESS)(target)


def _names_edit(rng: random.Random, config: dict[str, Any]) -> None:
    name = _name(rng)
    where = rng.randrange(4)
    entry = {"name": name, "options": {}} if rng.random() < 0.4 else name
    if where == 0:
        config["models"] = [entry]
    elif where == 1:
        config["models"] = [*config["models"], entry]
    elif where == 2:
        config["attacks"] = [{"name": "fc-bias", "models": [name]}]
    else:
        config["utility"] = {"data": "digits", "model": name, "clients": 2, "rounds": 1}


_VALUES = [-1, 0, 1, 10**6, 2**63, 10**30, 1e308, float("inf"), -0.0, "x", "", "a" * 5000, None, True, [], {},
           [1, 2], {"a": 1}, "../../../etc/passwd", "/dev/zero", 0.5]


def _values_edit(rng: random.Random, config: dict[str, Any]) -> None:
    value = rng.choice(_VALUES)
    choice = rng.randrange(9)
    if choice == 0:
        config["data"][rng.choice(["n", "size", "name", "start", "colour"])] = value
    elif choice == 1:
        config["batch_sizes"] = [value]
    elif choice == 2:
        config["seed"] = value
    elif choice == 3:
        config["models"] = [{"name": "mlp", "options": {rng.choice(["hidden", "width", "depth", "x"]): value}}]
    elif choice == 4:
        config["models"] = [{"name": "mlp", "weights": value}]
    elif choice == 5:
        config["attacks"] = [{"name": rng.choice(["fc-bias", " fc-bias", "FC-BIAS", "nope", value]),
                              "options": {rng.choice(["iterations", "restarts", "tv", "lr", "features",
                                                      "output_gradient", "mixture"]): value}}]
    elif choice == 6:
        config["defenses"] = [rng.choice(["gaussian:variance=", "pruning:ratio=", "clipping:max_norm="]) + str(value)]
    elif choice == 7:
        config["client"] = {rng.choice(["protocol", "lr", "local_steps", "batch_size", "epochs"]): value}
    else:
        config[rng.choice(["name", "dtype", "device", "threat", "verdict"])] = value


def _structure_edit(rng: random.Random, config: dict[str, Any]) -> Any:
    choice = rng.randrange(6)
    if choice == 0:
        config.pop(rng.choice(["models", "attacks", "data"]))
    elif choice == 1:
        config[rng.choice(["modles", "attack", "extra"])] = ["mlp"]
    elif choice == 2:
        config[rng.choice(["models", "attacks", "data", "defenses"])] = rng.choice(["mlp", 3, {"a": 1}, None])
    elif choice == 3:
        deep: Any = "mlp"
        for _ in range(rng.choice([10, 40, 200])):
            deep = [deep]
        config["models"] = [deep]
    elif choice == 4:
        return rng.choice([[], "text", 3, None, [config]])
    else:
        return "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefg", "bcdefgh")) + "models: *h\n"
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '"?"'


def _text(rng: random.Random, config: Any) -> tuple[str, str]:
    """(suffix, text): YAML, or TOML when the config is a mapping and the dice say so."""
    if isinstance(config, str):
        return ".yaml", config
    if isinstance(config, dict) and rng.random() < 0.3:
        return ".toml", "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in config.items())
    return rng.choice([".yaml", ".yml"]), yaml.safe_dump(config, allow_unicode=rng.random() < 0.5)


def hostile_configs(folder: Path, n: int, seed: int = 0) -> list[tuple[str, Path]]:
    """Write ``n`` configs into ``folder`` (and the two factory modules they name)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{EVIL}.py").write_text(_EVIL_SOURCE)
    (folder / f"{ALLOWED}.py").write_text(_ALLOWED_SOURCE)
    inputs = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        config: Any = _base(rng)
        if kind == "names":
            _names_edit(rng, config)
        elif kind == "values":
            _values_edit(rng, config)
        elif kind == "structure":
            config = _structure_edit(rng, config)
        suffix, text = _text(rng, config)
        path = folder / f"config-{index:06d}{suffix}"
        path.write_text(text, encoding="utf-8")
        inputs.append((kind, path))
    return inputs


def run_configs(folder: Path, n: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Campaign:
    """Generate ``n`` hostile configs; load each with only ``fuzz_allowed_module`` allowed, build
    every model of what loads, and record any import of the module that is never allowed."""
    import os
    import sys

    from ..audit import load_audit_config

    inputs = hostile_configs(folder, n, seed)
    marker = folder / MARKER
    effects: list[str] = []
    previous = os.environ.get("GRADLEAK_FUZZ_MARKER")
    os.environ["GRADLEAK_FUZZ_MARKER"] = str(marker)
    sys.path.insert(0, str(folder))

    def load(path: Path):
        try:
            config = load_audit_config(path, allow_imports=(ALLOWED,))
            size = config.data.get("size") or 8
            for choice in config.models:
                choice.spec(seed=0, dtype="float32", device="cpu").build((3, size, size), 10)
            return config
        finally:
            sys.modules.pop(EVIL, None)
            if marker.exists():
                effects.append(f"{path.name}: {EVIL} was imported without --allow-import")
                marker.unlink()

    try:
        campaign = run_inputs("configs", inputs, load, None, describe=str, progress=progress)
    finally:
        sys.path.remove(str(folder))
        if previous is None:
            os.environ.pop("GRADLEAK_FUZZ_MARKER", None)
        else:
            os.environ["GRADLEAK_FUZZ_MARKER"] = previous
    campaign.side_effects.extend(effects)
    return campaign


run = run_configs  # the surface's entry point for gradleak.fuzz.run_surface
