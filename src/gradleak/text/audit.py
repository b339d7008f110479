"""Text audits: a grid of text models x attacks x defenses x batch sizes on real sentences of the
built-in corpus (held-out topics) or a text file, each cell one :func:`~gradleak.text.pipeline.attack_text`
run folder, with the analyser's prediction beside what was measured, in one report.

A config is YAML with ``modality: text`` (``gradleak audit`` hands it here)::

    modality: text
    name: GPT-2 against the span attack
    data: {name: corpus, n: 8, length: 16}          # n sequences per cell, split into clients of the batch size
    models: [{name: gpt2, options: {width: 256, layers: 4, heads: 4}}]
    attacks: [dager, {name: bag-of-words, models: [bert]}]
    defenses: [none, gaussian:variance=1e-8]
    batch_sizes: [1, 4]
    dtype: float32

A cell whose attack refuses (its condition fails) is stored as ``refused`` with the reason.
Finished cells are stored (``cells/<id>/cell.json``, written last) and skipped by a rerun.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Mapping

from .._io import atomic_write_json, atomic_write_text
from ..errors import AttackNotApplicable, ConfigError, GradleakError
from ..limits import check_int, short_repr

__all__ = ["TextAuditConfig", "is_text_config", "load_text_audit", "text_audit_from_mapping", "run_text_audit"]

_KEYS = {"modality", "name", "data", "models", "attacks", "defenses", "batch_sizes", "dtype", "seed", "client"}


@dataclass(frozen=True)
class TextAuditConfig:
    name: str
    data: Mapping[str, Any]
    models: list[dict[str, Any]]
    attacks: list[dict[str, Any]]
    defenses: list[str]
    batch_sizes: list[int]
    dtype: str = "float32"
    seed: int = 0
    client: Mapping[str, Any] = field(default_factory=dict)


def _read(path: str | Path) -> Any:
    """The config's mapping, read and parsed as the image audit's (bounded, safe YAML, one-line
    errors with line and column)."""
    from ..audit._checks import check_tree
    from ..audit._parse import parse_config, read_config

    raw = parse_config(Path(path), read_config(Path(path)))
    if isinstance(raw, Mapping):
        check_tree(raw)
    return raw


def is_text_config(path: str | Path) -> bool:
    """Whether the config at ``path`` is a text audit (``modality: text``)."""
    if Path(path).suffix.lower() not in (".yaml", ".yml", ".toml"):
        return False
    try:
        value = _read(path)
    except GradleakError:   # unreadable or malformed: the image audit's loader says exactly why
        return False
    return isinstance(value, Mapping) and value.get("modality") == "text"


def _entries(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: a non-empty list, got {short_repr(value)}")
    out = []
    for item in value:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{key}: each entry is a name or {{name: ..., options: {{...}}}}, got {short_repr(item)}")
        unknown = set(entry) - {"name", "options", "models"}
        if unknown:
            raise ConfigError(f"{key}[{entry['name']}]: unknown key {sorted(unknown)[0]!r} (name, options, models)")
        out.append({"name": entry["name"], "options": dict(entry.get("options") or {}),
                    "models": entry.get("models")})
    return out


def load_text_audit(path: str | Path) -> TextAuditConfig:
    """The validated config at ``path`` (errors name the key)."""
    return text_audit_from_mapping(_read(path), path)


def text_audit_from_mapping(raw: Any, path: str | Path) -> TextAuditConfig:
    """The validated config from its parsed mapping (errors name the key)."""
    from ..attacks import get_attack
    from ..defenses import make_defenses
    from ..models import ModelSpec

    if not isinstance(raw, Mapping):
        raise ConfigError(f"audit config {str(path)!r}: a mapping of keys, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"audit config: unknown key {sorted(unknown)[0]!r}; keys: {', '.join(sorted(_KEYS))}")
    data = dict(raw.get("data") or {"name": "corpus"})
    if set(data) - {"name", "n", "length", "start"}:
        raise ConfigError(f"data: keys are name, n, length, start; got {sorted(data)}")
    data.setdefault("name", "corpus")
    data["n"] = check_int("data.n", data.get("n", 8), 1, 4096)
    data["length"] = check_int("data.length", data.get("length", 16), 2, 4096)
    models = _entries(raw.get("models"), "models")
    for m in models:
        if ModelSpec(m["name"], m["options"]).modality != "text":
            raise ConfigError(f"models[{m['name']}]: not a text model (gpt2, gpt2-classifier, bert, hf:FOLDER)")
    attacks = _entries(raw.get("attacks"), "attacks")
    for a in attacks:
        get_attack(a["name"])
    defenses = [str(d) for d in (raw.get("defenses") or ["none"])]
    for entry in defenses:       # each entry is one cell's defense, checked alone
        if entry != "none":
            make_defenses([entry])
    sizes = raw.get("batch_sizes") or [1]
    if not isinstance(sizes, list):
        raise ConfigError(f"batch_sizes: a list of integers, got {short_repr(sizes)}")
    sizes = [check_int("batch_sizes[]", b, 1, 4096) for b in sizes]
    for b in sizes:
        if data["n"] % b:
            raise ConfigError(f"batch_sizes: {b} does not divide data.n = {data['n']}")
    dtype = raw.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype: float32 or float64, got {short_repr(dtype)}")
    return TextAuditConfig(str(raw.get("name") or Path(path).stem), data, models, attacks, defenses, sizes, dtype,
                           check_int("seed", raw.get("seed", 0), 0, 2**31), dict(raw.get("client") or {}))


def _cells(config: TextAuditConfig) -> list[dict[str, Any]]:
    cells = []
    for model in config.models:
        for attack in config.attacks:
            if attack["models"] is not None and model["name"] not in attack["models"]:
                continue
            for defense in config.defenses:
                for batch in config.batch_sizes:
                    key = {"model": model, "attack": {k: attack[k] for k in ("name", "options")}, "defense": defense,
                           "batch": batch, "data": dict(config.data), "dtype": config.dtype, "seed": config.seed,
                           "client": dict(config.client)}
                    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
                    cells.append({**key, "id": f"{model['name']}-{attack['name']}-b{batch}-{digest}"})
    return cells


def _run_cell(cell: dict[str, Any], folder: Path, quiet: bool) -> dict[str, Any]:
    from ..client import ClientSetup
    from ..models import ModelSpec
    from .analysis import text_malicious, text_report
    from .pipeline import attack_text

    model = cell["model"]
    spec = ModelSpec(model["name"], model["options"], dtype=cell["dtype"], device="cpu", seed=cell["seed"])
    setup = ClientSetup(**{**cell["client"], "batch_size": cell["batch"], "seed": cell["seed"]})
    defenses = None if cell["defense"] == "none" else [cell["defense"]]
    record = {k: cell[k] for k in ("id", "model", "attack", "defense", "batch")}
    started = time.perf_counter()
    try:
        result = attack_text(cell["attack"]["name"], folder, data=cell["data"]["name"], n=cell["data"]["n"],
                             length=cell["data"]["length"], start=cell["data"].get("start", 0), model=spec,
                             client=setup, options=cell["attack"]["options"], defenses=defenses, quiet=quiet)
        record.update(status="done", **result.scores.summary)
        record["notes"] = result.reconstruction.notes[:6]
    except AttackNotApplicable as error:
        record.update(status="refused", reason=str(error), condition=error.condition)
    record["seconds"] = round(time.perf_counter() - started, 2)
    built = spec.build((cell["data"]["length"],), 2)     # the analyser's prediction, from the architecture alone
    rows = {r["attack"]: r for r in [*text_report(built.module, cell["batch"], cell["data"]["length"], built.loss),
                                     *text_malicious(built.module, cell["batch"], cell["data"]["length"], built.loss)]}
    record["prediction"] = rows.get(cell["attack"]["name"])
    return record


def run_text_audit(config: TextAuditConfig | str | Path, out: str | Path, *, quiet: bool = False,
                   resume: bool = True) -> dict[str, Any]:
    """Run every cell not stored yet; write ``audit.json``, ``cells.csv`` and ``report.html``."""
    config = config if isinstance(config, TextAuditConfig) else load_text_audit(config)
    out = Path(out)
    records = []
    for cell in _cells(config):
        folder = out / "cells" / cell["id"]
        stored = folder / "cell.json"
        if resume and stored.exists():
            records.append(json.loads(stored.read_text()))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        record = _run_cell(cell, folder, quiet)
        atomic_write_json(stored, record)
        records.append(record)
    summary = {"name": config.name, "cells": records}
    atomic_write_json(out / "audit.json", summary)
    atomic_write_text(out / "cells.csv", _csv(records))
    atomic_write_text(out / "report.html", _report(config, records))
    return summary


_COLUMNS = ("id", "model", "attack", "defense", "batch", "status", "rouge1", "rouge2", "exact_rate",
            "token_accuracy", "token_set_recall", "seconds", "predicted_exact", "reason")


def _row(r: Mapping[str, Any]) -> dict[str, Any]:
    prediction = r.get("prediction") or {}
    return {"id": r["id"], "model": r["model"]["name"], "attack": r["attack"]["name"], "defense": r["defense"],
            "batch": r["batch"], "status": r["status"], "rouge1": r.get("rouge1"), "rouge2": r.get("rouge2"),
            "exact_rate": r.get("exact_rate"), "token_accuracy": r.get("token_accuracy"),
            "token_set_recall": r.get("token_set_recall"), "seconds": r.get("seconds"),
            "predicted_exact": prediction.get("exact"), "reason": r.get("condition") or ""}


def _csv(records: list[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS)
    writer.writeheader()
    for r in records:
        writer.writerow(_row(r))
    return buffer.getvalue()


def _report(config: TextAuditConfig, records: list[Mapping[str, Any]]) -> str:
    from ..report.html import _table, html_page

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f} %"

    rows = []
    for r in map(_row, records):
        rows.append([escape(str(r[k])) for k in ("model", "attack", "defense", "batch", "status")]
                    + [pct(r["rouge1"]), pct(r["rouge2"]), pct(r["exact_rate"]), pct(r["token_set_recall"]),
                       escape({True: "exact", False: "fails", None: "-"}[r["predicted_exact"]]),
                       escape(str(r["seconds"])), escape(r["reason"])])
    headers = ["model", "attack", "defense", "batch", "status", "ROUGE-1", "ROUGE-2", "exact sequences",
               "token-set recall", "analyser", "s", "condition that failed"]
    sections = [f"<p>{escape(json.dumps(dict(config.data)))}; dtype {escape(config.dtype)}; each cell's run folder "
                "(recovered text beside the truth) is in <code>cells/</code>.</p>", _table(headers, rows)]
    return html_page(f"gradleak text audit: {config.name}", "text models x attacks x defenses x batch sizes", sections)
