"""The analyser's prediction for text models: where the span attack (``dager``) is exact.

The weight gradient of block 0's attention projection is X^T dL/dY over the B x n' input
positions that reach it (n' = n - 1 for a causal LM, whose last position computes no loss;
n for a classifier). Its column space is the span of those inputs as long as there are fewer
of them than the width of the space (the model width d; for LoRA adapters of rank r the
gradient of A has rank <= r, so at most r positions). Then each true token is in the span
and any other is not: the attack is exact. At B x n' >= d (or > r) the span is the whole
space (or misses inputs) and token membership cannot be told: the attack fails. Inputs that
repeat count once (block 0: the same token at the same position; block 1 of a decoder, which
assembles sequences: the same prefix): B x n' < d is the guarantee from the architecture alone;
the gradients' measured ranks (the numbers of distinct inputs) decide on a given update, and can
stay below d past it when sequences share their beginnings.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["span_condition", "text_report", "text_analysis", "text_malicious"]


def span_condition(model: nn.Module, batch: int, length: int, loss: str) -> dict[str, Any]:
    """``{"exact", "positions", "capacity", "why"}`` for the span attack on ``model`` at a batch of
    ``batch`` sequences of ``length`` tokens trained with ``loss``."""
    from .arch import TransformerView
    from .lora import is_lora

    view = TransformerView(model)
    positions = batch * (length - 1 if loss == "causal_lm" else length)
    if is_lora(model):
        rank = int(view.hf.peft_config["default"].r) if hasattr(view.hf, "peft_config") else None
        rank = rank if rank is not None else int(model.net.peft_config["default"].r)
        capacity, exact = rank, positions <= rank
        what = f"the LoRA rank r = {rank}"
    else:
        capacity, exact = view.width, positions < view.width
        what = f"the model width d = {view.width}"
    why = (f"{batch} x {positions // batch} = {positions} input positions {'<' if exact else '>='} {what}: "
           + ("each true token lies in the span of block 0's gradient and no other does; the span attack "
              "recovers every sequence exactly" if exact else
              "the gradient's span fills the space the inputs live in (or misses some of them); the span attack "
              "cannot tell tokens apart and refuses, unless sequences sharing their beginnings keep the number of "
              "distinct prefixes below it (the gradients' ranks show it)"))
    return {"exact": exact, "positions": positions, "capacity": capacity, "why": why}


def text_report(model: nn.Module, batch: int, length: int, loss: str) -> list[dict[str, Any]]:
    """Which text attacks apply to ``model`` at this batch and length, and whether each is exact,
    in words (``gradleak analyze --model gpt2 --input-shape 32 --batch-size 16``)."""
    from .arch import TransformerView
    from .lora import is_lora

    view = TransformerView(model)
    rows = []
    span = span_condition(model, batch, length, loss)
    if not view.decoder and batch > 1:
        span = {**span, "exact": False, "why": span["why"] + "; but an encoder's sequences at batch > 1 come from a "
                "bounded search over the tokens found at each position (every combination when few, else coordinate "
                "descent): the sequences it confirms at block 1 are exact, the others are returned unassembled"}
    rows.append({"attack": "dager", "applies": True, "exact": span["exact"], "why": span["why"]})
    tied = view.decoder and view.task == "causal-lm" and bool(view.hf.config.tie_word_embeddings)
    if is_lora(model):
        bag = (False, "the token embedding is frozen under LoRA: no embedding gradient is shared")
    elif tied:
        bag = (False, "the token embedding is tied to the language-model head, whose gradient fills every row")
    else:
        last = " (a causal LM's last tokens reach no gradient: they are missed)" if loss == "causal_lm" else ""
        bag = (True, "the non-zero rows of the token-embedding gradient are exactly the batch's token set, at any "
                     f"batch size{last}")
    rows.append({"attack": "bag-of-words", "applies": bag[0], "exact": bag[0] and loss != "causal_lm", "why": bag[1]})
    for name in ("tag", "lamp"):
        ok = loss != "causal_lm"
        rows.append({"attack": name, "applies": ok, "exact": False,
                     "why": "optimisation on token embeddings: approximate, no guarantee" if ok else
                     "matches a classifier's gradient; a causal LM's targets are its text"})
    return rows


def text_malicious(model: nn.Module, batch: int, length: int, loss: str) -> list[dict[str, Any]]:
    """What a malicious server gets from ``model`` (the SoK's threat model G): Decepticons' corrupted
    parameters, with the expected number of tokens alone in a bin (exact)."""
    from .arch import TransformerView
    from .lora import is_lora

    view = TransformerView(model)
    blocks = view.layers if loss == "causal_lm" else view.layers - 1
    if is_lora(model) or blocks < 1:
        why = ("only the LoRA adapters train: no feed-forward layer shares a gradient" if is_lora(model) else
               "a classifier of one block: no attention after its feed-forward layer carries the loss to every position")
        return [{"attack": "decepticons", "applies": False, "exact": False, "why": why}]
    hidden = int(view.hf.config.n_inner or 4 * view.width) if view.decoder else int(view.hf.config.intermediate_size)
    bins = blocks * (hidden - 1)
    tokens = batch * (length - 1 if loss == "causal_lm" else length)
    alone = tokens * (1 - 1 / bins) ** (tokens - 1)
    return [{"attack": "decepticons", "applies": True, "exact": True,
             "why": f"about {alone:.1f} of {tokens} tokens alone in one of its {bins:,} bins ({blocks} feed-forward "
                    f"layers of {hidden} units), each exactly, with its position and its sequence; two or three sharing "
                    "a bin are told apart by their sequences (fewer distinct inputs, shared prefixes, only help)"}]


def text_analysis(model: nn.Module, length: int, batch: int, loss: str):
    """:func:`text_report` as the analyser's :class:`~gradleak.analysis.LeakageReport` (what
    ``attacks="auto"`` and the Flower audit's explanations read): one verdict per text attack."""
    from ..analysis.analyzer import AttackVerdict, LeakageReport

    verdicts = [AttackVerdict(r["attack"], bool(r["applies"]), bool(r["exact"]), r["why"])
                for r in text_report(model, batch, length, loss)]
    exact = [v for v in verdicts if v.exact]
    verdict = "EXACT RECOVERY PREDICTED" if exact else "NO EXACT CLOSED-FORM RECOVERY"
    reasons = [f"{v.attack}: {v.reason}" for v in exact] or [
        "no exact text attack's conditions hold; gradient matching on token embeddings may still approximate"]
    malicious = [AttackVerdict(r["attack"], bool(r["applies"]), bool(r["exact"]), r["why"])
                 for r in text_malicious(model, batch, length, loss)]
    return LeakageReport(type(model).__name__, (int(length),), int(batch), [], verdicts, verdict, reasons,
                         malicious=malicious)
