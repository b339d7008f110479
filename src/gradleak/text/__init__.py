"""Text as a modality of gradleak: real English sentences that ship with the package, an
offline tokenizer, small transformers built from configs, text clients (FedSGD, FedAvg,
LoRA) and the metrics of the text attacks (ROUGE, token accuracy, exact sequences).

Nothing here downloads anything: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is
imported (:func:`gradleak.text.models.offline_transformers`), models are built from their
config classes or a local ``save_pretrained`` folder, and the tokenizer is the one shipped
in ``assets/tokenizer.json`` (trained by ``scripts/build_text_assets.py``) or the user's
``tokenizer.json``. See ``docs/text.md``.
"""

from .corpus import (BUILTIN_TEXT, TEXT_CLASSES, TokenizedText, builtin_sentences, held_out_topics, load_text,
                     load_tokenizer)

__all__ = ["BUILTIN_TEXT", "TEXT_CLASSES", "TokenizedText", "builtin_sentences", "held_out_topics", "load_text",
           "load_tokenizer"]
