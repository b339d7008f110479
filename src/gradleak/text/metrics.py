"""Scores of a text reconstruction against the truth, after matching (the batch order is
unknown to the attacker): ROUGE-1/2/L F-measures (``rouge-score``, Lin 2004, on the decoded
text), token accuracy (matched positions with the right token), the exact-sequence rate, and
the precision and recall of the set of tokens recovered (the bag of words) against the batch's.
Positions an attack did not recover hold -1 and count as wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["match_sequences", "TextScores", "score_text", "decode"]


def match_sequences(recovered: torch.Tensor, truth: torch.Tensor) -> list[int | None]:
    """For each true sequence, the index of its recovered sequence (Hungarian matching on the
    number of equal tokens), or None when fewer sequences were recovered."""
    if recovered is None or recovered.numel() == 0:
        return [None] * truth.shape[0]
    n = min(recovered.shape[1], truth.shape[1])
    agree = (recovered[None, :, :n] == truth[:, None, :n]).sum(-1).cpu().numpy()   # (B_true, B_rec)
    rows, cols = linear_sum_assignment(-agree)
    out: list[int | None] = [None] * truth.shape[0]
    for r, c in zip(rows, cols):
        out[int(r)] = int(c)
    return out


def decode(tokenizer, ids: torch.Tensor) -> str:
    """Text of a row of token ids; unrecovered positions (-1) show as a placeholder."""
    pieces, run = [], []
    for t in ids.tolist():
        if t < 0:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append("\u25a1")
        else:
            run.append(t)
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)


@dataclass
class TextScores:
    summary: dict[str, Any]
    per_sequence: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_sequence": self.per_sequence}


def score_text(recovered: torch.Tensor | None, truth: torch.Tensor, tokenizer) -> TextScores:
    """ROUGE-1/2/L (F), token accuracy and exact-sequence rate of ``recovered`` against ``truth``."""
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)   # rouge-score logs "Using default tokenizer" at INFO

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    pairs = match_sequences(recovered, truth)
    rows = []
    for k, j in enumerate(pairs):
        true_text = tokenizer.decode(truth[k].tolist())
        if j is None:
            rows.append({"truth": true_text, "recovered": None, "match": None, "rouge1": 0.0, "rouge2": 0.0,
                         "rougeL": 0.0, "token_accuracy": 0.0, "exact": False, "recovered_tokens": []})
            continue
        rec = recovered[j]
        n = min(rec.shape[0], truth.shape[1])
        same = (rec[:n] == truth[k, :n])
        text = decode(tokenizer, rec)
        r = scorer.score(true_text, text.replace("\u25a1", " "))
        rows.append({"truth": true_text, "recovered": text, "match": j, "rouge1": r["rouge1"].fmeasure,
                     "rouge2": r["rouge2"].fmeasure, "rougeL": r["rougeL"].fmeasure,
                     "token_accuracy": float(same.sum()) / truth.shape[1],
                     "exact": bool(same.all()) and rec.shape[0] == truth.shape[1],
                     "recovered_tokens": same.int().tolist()})
    mean = lambda key: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    found = set() if recovered is None else {t for t in recovered.flatten().tolist() if t >= 0}
    true_set = set(truth.flatten().tolist())
    summary = {"n_sequences": len(rows), "n_recovered": 0 if recovered is None else int(recovered.shape[0]),
               "rouge1": mean("rouge1"), "rouge2": mean("rouge2"), "rougeL": mean("rougeL"),
               "token_accuracy": mean("token_accuracy"), "exact_rate": mean("exact"),
               "token_set_precision": len(found & true_set) / len(found) if found else None,
               "token_set_recall": len(found & true_set) / len(true_set)}
    return TextScores(summary, rows)
