"""Build the text assets gradleak ships (run once; the outputs are committed):

- ``src/gradleak/text/assets/corpus.txt``: real English sentences from the Python
  Language Reference as every Python ships it (``pydoc_data.topics``, ~465,000 characters,
  PSF License). One line per sentence, ``topic<TAB>sentence``; topics are the documents.
- ``src/gradleak/text/assets/tokenizer.json``: a byte-level BPE (``tokenizers``) trained on
  the *train* topics only (the held-out topics are never seen by the tokenizer, the LM prior
  or any tuning).

    PYTHONPATH=src python scripts/build_text_assets.py

Prose only: paragraphs that are not indented (code and grammar are), headings and tables
dropped; sentences of 6 to 80 words, mostly letters, without grammar symbols.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gradleak" / "text" / "assets"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def prose_paragraphs(text: str) -> list[str]:
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if not line.strip() or line.startswith((" ", "\t")) or set(line.strip()) <= set("*=-+|~^"):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(line.strip())
    return paragraphs


def good(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 80 or any(s in sentence for s in ("::=", ">>>", "**", "[1]", "http", "See also")):
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) > 0.8 and sentence[0].isupper() and sentence[-1] in ".!?"


def sentences() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for paragraph in prose_paragraphs(topics[topic]):
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = " ".join(sentence.split())
                if good(sentence):
                    out.append((topic, sentence))
    return out


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gradleak.text.corpus import held_out_topics

    rows = sentences()
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / "corpus.txt").write_text("".join(f"{t}\t{s}\n" for t, s in rows), encoding="utf-8")
    held = held_out_topics(sorted({t for t, _ in rows}))
    train = [s for t, s in rows if t not in held]

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(train, trainer)
    tokenizer.save(str(ASSETS / "tokenizer.json"))
    words = sum(len(s.split()) for _, s in rows)
    print(f"{len(rows)} sentences ({words} words) from {len({t for t, _ in rows})} topics; "
          f"{len(train)} train sentences; held-out topics: {', '.join(sorted(held))}; "
          f"vocabulary {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
