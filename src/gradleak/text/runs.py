"""Run folders of text attacks: what was recovered beside the truth, scored and shown.

::

    RUN_DIR/
      config.json                 what was run (attack, options, model, data, client, threat model)
      metrics.json                ROUGE-1/2/L, token accuracy, exact-sequence rate, per sequence; the
                                  update residual (truth-free: the recovered tokens' update against the
                                  observed one, gradleak.residual); notes
      history.json                the attack's curves (e.g. candidates per position)
      reconstruction.safetensors  recovered token ids (-1: not recovered) and the true ones
      report.html                 each true sequence beside its recovered one, tokens marked

The true tokens are stored for evaluation only; they never reach an attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..attacks.base import Reconstruction
from ..residual import Residual, residual_summary
from .metrics import TextScores, match_sequences, score_text

__all__ = ["TextRunResult", "write_text_run", "render_text_report", "load_text_truth", "TEXT_RUN_TENSORS",
           "rebuild_text_report"]

TEXT_RUN_TENSORS = ("tokens", "true_tokens")

# the score table's rows, in words; rates shown as percentages
_LABELS = {"n_sequences": "sequences", "n_recovered": "sequences recovered", "rouge1": "ROUGE-1 (F)",
           "rouge2": "ROUGE-2 (F)", "rougeL": "ROUGE-L (F)", "token_accuracy": "token accuracy",
           "exact_rate": "exact sequences", "token_set_precision": "token-set precision",
           "token_set_recall": "token-set recall"}

_CSS = """
.seq { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .86rem;
       white-space: pre-wrap; margin: .15rem 0; }
.ok { background: #d1f4dc; } .bad { background: #ffd7d5; text-decoration: line-through; }
.miss { background: #e6e8eb; color: #8c959f; }
.legend span { padding: 0 .3rem; margin-right: .6rem; }
"""


@dataclass
class TextRunResult:
    run_dir: Path
    reconstruction: Reconstruction
    scores: TextScores | None
    residuals: list[Residual] | None = None

    @property
    def report(self) -> Path:
        return self.run_dir / "report.html"


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    return ["\u25a1" if t < 0 else tokenizer.decode([t]) for t in ids]


def _marked(tokenizer, recovered: list[int], truth: list[int]) -> str:
    """The recovered sequence, each token marked: right (green), wrong (struck, red), not recovered (grey)."""
    spans = []
    for k, (piece, token) in enumerate(zip(_pieces(tokenizer, recovered), recovered)):
        css = "miss" if token < 0 else "ok" if k < len(truth) and token == truth[k] else "bad"
        spans.append(f'<span class="{css}">{escape(piece)}</span>')
    return "".join(spans)


def render_text_report(title: str, scores: TextScores | None, recovered: torch.Tensor | None, truth: torch.Tensor | None,
                       tokenizer, config: dict[str, Any], notes: list[str], residual: Mapping | None = None) -> str:
    """The run's page: scores and the update residual (truth-free), each recovered sequence
    beside the truth with its tokens marked, notes and configuration."""
    from ..report.html import _residual_rows, _table, html_page

    sections = [f"<style>{_CSS}</style>"]
    rows = []
    if scores is not None:
        s = scores.summary
        rows = [[escape(_LABELS.get(k, k.replace("_", " "))),
                 escape(f"{100 * v:.1f} %" if isinstance(v, float) and k in _LABELS else
                        f"{v:.4g}" if isinstance(v, float) else str(v))] for k, v in s.items()]
    rows += [list(row) for row in _residual_rows({"residual": residual})]
    if rows:
        heading = "Scores (after matching sequences)" if scores is not None else "Without ground truth"
        sections.append(f"<h2>{heading}</h2>" + _table(None, rows, "kv"))
    if recovered is not None and truth is not None:
        pairs = match_sequences(recovered, truth)
        blocks = ['<p class="legend"><span class="ok">recovered</span><span class="bad">wrong</span>'
                  '<span class="miss">not recovered</span></p>']
        for k, j in enumerate(pairs):
            true_ids = truth[k].tolist()
            line = _marked(tokenizer, recovered[j].tolist(), true_ids) if j is not None else \
                '<span class="miss">(no sequence recovered for this one)</span>'
            blocks.append(f"<h3>Sequence {k}</h3><p class=\"seq\"><b>truth</b>&nbsp;&nbsp;&nbsp;&nbsp;"
                          f"{escape(tokenizer.decode(true_ids))}</p><p class=\"seq\"><b>recovered</b> {line}</p>")
        sections.append("<h2>Recovered beside the truth</h2>" + "\n".join(blocks))
    elif recovered is not None:
        sections.append("<h2>Recovered</h2>" + "\n".join(
            f'<p class="seq">{escape("".join(_pieces(tokenizer, row.tolist())))}</p>' for row in recovered))
    if notes:
        sections.append("<h2>Notes</h2><ul class=\"notes\">" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    flat = [[escape(str(k)), f"<code>{escape(str(v))[:400]}</code>"] for k, v in config.items()]
    sections.append("<h2>Configuration</h2>" + _table(None, flat, "kv"))
    model, data = config.get("model"), config.get("data")
    subtitle = " · ".join(str(part) for part in (
        model.get("name") if isinstance(model, Mapping) else None,
        f"{data.get('n')} sequence(s) of {data.get('length')} tokens from {data.get('name')}" if isinstance(data, Mapping)
        else config.get("update_file")) if part)
    return html_page(title, escape(subtitle), sections)


def write_text_run(run_dir: str | Path, reconstruction: Reconstruction, *, truth: torch.Tensor | None,
                   tokenizer, config: dict[str, Any], residuals: list[Residual] | None = None) -> TextRunResult:
    """Score ``reconstruction.tokens`` against ``truth`` (B, n) and write the run folder;
    ``residuals``: each attacked update's residual (:func:`gradleak.residual.reconstruction_residual`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recovered = reconstruction.tokens
    scores = None if truth is None or recovered is None else score_text(recovered, truth, tokenizer)
    config = {"attack": reconstruction.attack, **config, "attack_config": reconstruction.config}
    tensors = {}
    if recovered is not None:
        tensors["tokens"] = recovered.to(torch.int64).contiguous().cpu()
    if truth is not None:
        tensors["true_tokens"] = truth.to(torch.int64).contiguous().cpu()
    if tensors:
        atomic_write_bytes(run_dir / "reconstruction.safetensors", safetensors_save(tensors))
    atomic_write_json(run_dir / "config.json", config)
    atomic_write_json(run_dir / "history.json", reconstruction.history)
    residual = None if residuals is None else residual_summary(residuals)
    atomic_write_json(run_dir / "metrics.json", {**(scores.to_json() if scores else {}), "notes": reconstruction.notes,
                                                 "interrupted": reconstruction.interrupted,
                                                 **({"residual": residual} if residual is not None else {})})
    atomic_write_text(run_dir / "report.html", render_text_report(
        f"gradleak text run: {reconstruction.attack}", scores, recovered, truth, tokenizer, config, reconstruction.notes,
        residual))
    return TextRunResult(run_dir, reconstruction, scores, residuals)


def load_text_truth(path: str | Path) -> torch.Tensor:
    from ..data._files import read_safetensors
    from ..errors import DataError

    tensors = read_safetensors(path, "truth file", 2**30)
    ids = tensors.get("true_tokens")
    if ids is None or ids.ndim != 2 or ids.dtype != torch.int64:
        raise DataError(f"truth file {str(path)!r}: no (B, n) int64 entry 'true_tokens' (write it with capture --truth)")
    return ids


def _token_rows(path: Path, name: str, value: torch.Tensor, vocab: int, unrecovered: bool) -> torch.Tensor:
    """A stored (B, n) int64 tensor of token ids in the vocabulary (-1 allowed where not recovered)."""
    from ..data._files import quote
    from ..errors import DataError

    if value.dtype != torch.int64 or value.ndim != 2:
        raise DataError(f"run file {quote(path)}: entry {name!r} must be (sequences, length) int64, got "
                        f"{str(value.dtype).replace('torch.', '')} {tuple(value.shape)}")
    low = -1 if unrecovered else 0
    if value.numel() and (int(value.min()) < low or int(value.max()) >= vocab):
        raise DataError(f"run file {quote(path)}: entry {name!r} holds ids outside [{low}, {vocab}) (the built-in "
                        "tokenizer's vocabulary)")
    return value


def rebuild_text_report(run_dir: str | Path) -> Path:
    """Rescore and rewrite ``report.html`` of a text run folder from its stored token ids
    (``gradleak report RUN``), every file checked and bounded first; decoded with the built-in
    tokenizer (a run made with another tokenizer is refused if its ids do not fit it)."""
    from .._runfiles import MAX_RUN_JSON_BYTES, MAX_RUN_TENSOR_BYTES, _run_folder
    from ..data._files import quote, read_json, read_safetensors
    from ..errors import DataError
    from .corpus import load_tokenizer

    run_dir = _run_folder(run_dir)
    tensor_file = run_dir / "reconstruction.safetensors"
    tensors = read_safetensors(tensor_file, "run file", MAX_RUN_TENSOR_BYTES)
    unknown = sorted(set(tensors) - set(TEXT_RUN_TENSORS))
    if unknown:
        raise DataError(f"run file {quote(tensor_file)}: entry {unknown[0]!r} is not one of a text run's "
                        f"({', '.join(TEXT_RUN_TENSORS)})")
    tokenizer = load_tokenizer()
    vocab = tokenizer.get_vocab_size()
    recovered = tensors.get("tokens")
    recovered = None if recovered is None else _token_rows(tensor_file, "tokens", recovered, vocab, True)
    truth = tensors.get("true_tokens")
    truth = None if truth is None else _token_rows(tensor_file, "true_tokens", truth, vocab, False)
    documents = {}
    for name in ("config.json", "metrics.json"):
        value = read_json(run_dir / name, "run file", MAX_RUN_JSON_BYTES) if (run_dir / name).exists() else {}
        if not isinstance(value, dict):
            raise DataError(f"run file {quote(run_dir / name)}: must hold a JSON object")
        documents[name] = value
    notes = documents["metrics.json"].get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise DataError(f"run file {quote(run_dir / 'metrics.json')}: entry 'notes' must be a list of strings")
    scores = None if truth is None or recovered is None else score_text(recovered, truth, tokenizer)
    config = documents["config.json"]
    residual = documents["metrics.json"].get("residual")
    page = render_text_report(f"gradleak text run: {config.get('attack', '')}", scores, recovered, truth, tokenizer,
                              config, notes, residual if isinstance(residual, Mapping) else None)
    return atomic_write_text(run_dir / "report.html", page)
