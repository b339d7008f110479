"""Real English text, offline: the built-in corpus, local text files, and the tokenizer.

The built-in corpus (``assets/corpus.txt``) holds 1,367 sentences of prose from the
Python Language Reference as every CPython ships it (``pydoc_data.topics``; Python Software
Foundation License), extracted by ``scripts/build_text_assets.py``: prose paragraphs only,
sentences of 6-60 words. Its 79 topics are its documents; a seeded fifth of the topics is
**held out** (:func:`held_out_topics`): the tokenizer, the language-model prior and every
tuning use the train topics only, and the figures of ``docs/text.md`` come from held-out
topics.

A client's sequences are cut at sentence starts: consecutive sentences of one topic are
joined until ``length`` tokens are reached and the sequence is cut there, and the next
sequence starts at the next unused sentence (no two sequences share text). The class of a
sequence (for classifiers) is its topic's group: a *statement* of the language (``if``,
``for``, ``import``...) or anything else (types, expressions, the data model).

A local text file holds one sequence per line (UTF-8, at most :data:`MAX_TEXT_BYTES`); a
line may start with an integer class and a tab. Lines shorter than ``length`` tokens are
skipped; longer ones are cut.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError
from ..limits import check_int, short_repr

__all__ = ["BUILTIN_TEXT", "TEXT_CLASSES", "TokenizedText", "builtin_sentences", "held_out_topics", "load_text",
           "load_tokenizer", "MAX_TEXT_BYTES", "MAX_LENGTH"]

BUILTIN_TEXT = ("corpus", "corpus-train", "corpus-heldout")
TEXT_CLASSES = ("other", "statement")
MAX_TEXT_BYTES = 64 * 2**20
MAX_TOKENIZER_BYTES = 64 * 2**20
MAX_LENGTH = 4096
MAX_SEQUENCES = 100_000
HELD_OUT_FRACTION = 0.2
_STATEMENTS = frozenset({
    "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "for", "function",
    "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield"})


def held_out_topics(topics: Sequence[str]) -> frozenset[str]:
    """The held-out fifth of ``topics``: those whose SHA-256 (of ``gradleak-text:<topic>``) is
    smallest. Deterministic, independent of order and of any RNG."""
    ranked = sorted(topics, key=lambda t: hashlib.sha256(f"gradleak-text:{t}".encode()).hexdigest())
    return frozenset(ranked[: max(1, round(HELD_OUT_FRACTION * len(ranked)))])


@lru_cache(maxsize=1)
def _corpus_rows() -> tuple[tuple[str, str], ...]:
    text = resources.files("gradleak.text").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if "\t" in line)  # type: ignore[misc]


def builtin_sentences(split: str = "held-out") -> list[tuple[str, str]]:
    """``(topic, sentence)`` of the built-in corpus: ``split`` is ``train``, ``held-out`` or ``all``."""
    if split not in ("train", "held-out", "all"):
        raise ConfigError(f"split must be 'train', 'held-out' or 'all', got {short_repr(split)}")
    rows = _corpus_rows()
    held = held_out_topics(sorted({t for t, _ in rows}))
    if split == "all":
        return list(rows)
    return [(t, s) for t, s in rows if (t in held) == (split == "held-out")]


@lru_cache(maxsize=8)
def _tokenizer_from(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def load_tokenizer(path: str | os.PathLike | None = None):
    """A ``tokenizers.Tokenizer``: the built-in byte-level BPE (8,192 tokens, trained on the
    corpus's train topics) or the user's ``tokenizer.json`` (a file, or a folder holding one)."""
    from ..data._files import read_bounded

    if path is None:
        return _tokenizer_from(resources.files("gradleak.text").joinpath("assets/tokenizer.json").read_text("utf-8"))
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    data = read_bounded(path, "tokenizer", MAX_TOKENIZER_BYTES)
    try:
        return _tokenizer_from(data.decode("utf-8"))
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own Exception types
        raise DataError(f"tokenizer {path!r}: not a tokenizer.json ({type(error).__name__}: "
                        f"{str(error)[:200]})") from None


@dataclass(frozen=True, eq=False)
class TokenizedText:
    """Sequences of ``length`` token ids: ``ids`` (N, length) int64, ``labels`` (N,) int64
    indexing ``classes``, the ``texts`` they decode to, the source ``name``."""

    ids: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, indices: Sequence[int]) -> "TokenizedText":
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TokenizedText(self.ids[index], self.labels[index], [self.texts[i] for i in index.tolist()],
                             self.classes, self.name)


def _builtin_sequences(split: str, length: int, tokenizer) -> tuple[list[list[int]], list[int]]:
    rows = builtin_sentences(split)
    sequences, labels = [], []
    k = 0
    while k < len(rows):
        topic, ids = rows[k][0], []
        while k < len(rows) and rows[k][0] == topic and len(ids) < length:
            ids.extend(tokenizer.encode((" " if ids else "") + rows[k][1]).ids)
            k += 1
        if len(ids) >= length:      # a topic's tail shorter than ``length`` is dropped
            sequences.append(ids[:length])
            labels.append(int(topic in _STATEMENTS))
    return sequences, labels


def _file_sequences(path: str, length: int, tokenizer) -> tuple[list[list[int]], list[int]]:
    from ..data._files import read_bounded

    data = read_bounded(path, "text file", MAX_TEXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"text file {path!r}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})") from None
    sequences, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        label, tab, rest = line.partition("\t")
        if tab and label.strip().isdigit() and len(label.strip()) < 6:
            line, value = rest, int(label)
        else:
            value = 0
        ids = tokenizer.encode(line.strip()).ids if line.strip() else []
        if len(ids) >= length:
            sequences.append(ids[:length])
            labels.append(value)
        if len(sequences) >= MAX_SEQUENCES:
            break
    return sequences, labels


def load_text(name: str | os.PathLike = "corpus", *, n: int | None = 8, length: int = 16, start: int = 0,
              split: str = "held-out", tokenizer: Any = None) -> TokenizedText:
    """``n`` sequences of ``length`` tokens from ``start``: from the built-in corpus (``corpus``:
    the ``split`` given, default held-out; ``corpus-train``/``corpus-heldout`` name the split)
    or a local text file (one sequence per line). ``tokenizer``: a ``tokenizers.Tokenizer``,
    a path to a ``tokenizer.json``, or None for the built-in one."""
    check_int("length", length, 2, MAX_LENGTH)
    check_int("start", start, 0, MAX_SEQUENCES)
    if n is not None:
        check_int("n", n, 1, MAX_SEQUENCES)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    text = os.fspath(name)
    if text in BUILTIN_TEXT:
        split = {"corpus-train": "train", "corpus-heldout": "held-out"}.get(text, split)
        sequences, labels = _builtin_sequences(split, length, tokenizer)
        classes, source = TEXT_CLASSES, f"corpus ({split})"
    elif os.path.exists(text):
        sequences, labels = _file_sequences(text, length, tokenizer)
        classes, source = tuple(str(c) for c in range(max(labels, default=0) + 1)) or ("0",), text
        if len(classes) < 2:
            classes = ("0", "1")
    else:
        raise DataError(f"text data {text!r}: not a built-in name ({', '.join(BUILTIN_TEXT)}) and no such file")
    stop = len(sequences) if n is None else start + n
    if stop > len(sequences) or start >= len(sequences):
        raise DataError(f"text data {source!r}: {len(sequences)} sequences of at least {length} tokens; "
                        f"asked for {n} from {start}")
    chosen = sequences[start:stop]
    ids = torch.tensor(chosen, dtype=torch.long)
    return TokenizedText(ids, torch.tensor(labels[start:stop], dtype=torch.long),
                         [tokenizer.decode(s) for s in chosen], classes, source)
