"""Small transformers built offline with ``transformers``: from a config, or from a local
``save_pretrained`` folder (``config.json`` + safetensors weights). Nothing is downloaded:
``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported, and a folder is read with
``local_files_only=True`` and ``use_safetensors=True`` (no pickles, no remote code).

Every text model is wrapped so that ``model(ids)`` takes (B, n) int64 token ids (or (B, n, d)
float token embeddings) and returns a tensor: :class:`CausalLM` the next-token logits (B, n, V), :class:`SequenceClassifier` the
class logits (B, K). The wrapped Hugging Face module is ``model.net``; parameter names are
``net.<its names>``. The zoo names (``gradleak list``): ``gpt2`` (a GPT-2 decoder, causal-LM
loss; the defaults are GPT-2 small, d = 768, 12 layers, 12 heads), ``gpt2-classifier`` (the
same decoder with a classification head, as DAGER attacks it), ``bert`` (a BERT encoder with
a classification head). ``lora_rank=r`` turns any of them into its LoRA form
(:mod:`gradleak.text.lora`): the only parameters are then the adapters.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, one_line
from ..limits import check_int, short_repr

__all__ = ["offline_transformers", "CausalLM", "SequenceClassifier", "ImageViT", "gpt2", "gpt2_classifier", "bert", "vit",
           "hf_model",
           "builtin_vocab_size", "text_task", "PAD_ID"]

PAD_ID = 1        # "<pad>" in the built-in tokenizer (never in the built-in sequences)
EOS_ID = 0        # "<|endoftext|>"


def offline_transformers():
    """``transformers``, imported with the hub switched off (``HF_HUB_OFFLINE=1``)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def builtin_vocab_size() -> int:
    from .corpus import load_tokenizer

    return load_tokenizer().get_vocab_size()


class CausalLM(nn.Module):
    """A decoder language model: ``forward(ids)`` -> next-token logits (B, n, V); loss ``causal_lm``."""

    task = "causal-lm"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(**_inputs(self.net, ids), use_cache=False).logits


def _inputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids (B, n) as ``input_ids``; a float tensor (B, n, d) as ``inputs_embeds``: the
    continuous token embeddings the gradient-matching attacks (TAG, LAMP) optimise. Position ids
    (and BERT's segment ids) are given per example, (B, n), as the model would broadcast them from
    (1, n): the same values, but every example's embedding lookups are its own, which per-example
    gradients need (Opacus's DP-SGD reads each layer's input batch by batch)."""
    batch, length = x.shape[0], x.shape[1]
    inputs = {"inputs_embeds": x} if x.is_floating_point() else {"input_ids": x}
    inputs["position_ids"] = torch.arange(length, device=x.device).expand(batch, length)
    if getattr(net.config, "model_type", None) == "bert":
        inputs["token_type_ids"] = torch.zeros((batch, length), dtype=torch.long, device=x.device)
    return inputs


class SequenceClassifier(nn.Module):
    """A sequence classifier: ``forward(ids)`` -> class logits (B, K); loss ``cross_entropy``."""

    task = "classification"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(**_inputs(self.net, ids), use_cache=False).logits if _takes_cache(self.net) else \
            self.net(**_inputs(self.net, ids)).logits


def _takes_cache(net: nn.Module) -> bool:
    return getattr(net.config, "is_decoder", False) or net.config.model_type in ("gpt2",)


def text_task(model: nn.Module) -> str | None:
    """``causal-lm``, ``classification`` or None (not a gradleak text model)."""
    return getattr(model, "task", None) if isinstance(model, (CausalLM, SequenceClassifier)) else None


def _sizes(width: Any, layers: Any, heads: Any, positions: Any, vocab: Any) -> tuple[int, int, int, int, int]:
    width = check_int("width", width, 2, 16384)
    layers = check_int("layers", layers, 1, 256)
    heads = check_int("heads", heads, 1, 256)
    if width % heads:
        raise ConfigError(f"width {width} is not a multiple of heads {heads}")
    positions = check_int("positions", positions, 2, 65536)
    vocab = builtin_vocab_size() if vocab is None else check_int("vocab", vocab, 2, 1_000_000)
    return width, layers, heads, positions, vocab


def _gpt2_config(width, layers, heads, positions, vocab, dropout, tie, classes=None):
    transformers = offline_transformers()
    width, layers, heads, positions, vocab = _sizes(width, layers, heads, positions, vocab)
    dropout = float(dropout)
    extra = {} if classes is None else {"num_labels": int(classes), "pad_token_id": PAD_ID}
    return transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=positions,
                                   resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                   bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=bool(tie),
                                   attn_implementation="eager", **extra)


def _lora(model: nn.Module, lora_rank: Any, lora_alpha: Any, lora_init: str) -> nn.Module:
    if lora_rank is None:
        return model
    from .lora import apply_lora

    return apply_lora(model, rank=lora_rank, alpha=lora_alpha, init=lora_init)


def gpt2(shape=(16,), num_classes=None, *, width=768, layers=12, heads=12, positions=1024, vocab=None, dropout=0.0,
         tie=True, lora_rank=None, lora_alpha=None, lora_init="trained") -> nn.Module:
    """A GPT-2 decoder language model (random init; GPT-2 small by default: d = 768, 12 layers,
    12 heads, 1,024 positions, tied input/output embeddings) over the built-in vocabulary."""
    transformers = offline_transformers()
    config = _gpt2_config(width, layers, heads, positions, vocab, dropout, tie)
    return _lora(CausalLM(transformers.GPT2LMHeadModel(config)), lora_rank, lora_alpha, lora_init)


def gpt2_classifier(shape=(16,), num_classes=2, *, width=768, layers=12, heads=12, positions=1024, vocab=None,
                    dropout=0.0, lora_rank=None, lora_alpha=None, lora_init="trained") -> nn.Module:
    """The GPT-2 decoder with a classification head on the last token (as DAGER attacks it)."""
    transformers = offline_transformers()
    config = _gpt2_config(width, layers, heads, positions, vocab, dropout, True, num_classes or 2)
    return _lora(SequenceClassifier(transformers.GPT2ForSequenceClassification(config)), lora_rank, lora_alpha,
                 lora_init)


def bert(shape=(16,), num_classes=2, *, width=768, layers=12, heads=12, positions=512, vocab=None, dropout=0.0,
         lora_rank=None, lora_alpha=None, lora_init="trained") -> nn.Module:
    """A BERT encoder with a classification head on the first token (random init; BERT-base
    sizes by default)."""
    transformers = offline_transformers()
    width, layers, heads, positions, vocab = _sizes(width, layers, heads, positions, vocab)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * width,
                                     max_position_embeddings=positions, hidden_dropout_prob=float(dropout),
                                     attention_probs_dropout_prob=float(dropout), num_labels=int(num_classes or 2),
                                     pad_token_id=PAD_ID, attn_implementation="eager")
    return _lora(SequenceClassifier(transformers.BertForSequenceClassification(config)), lora_rank, lora_alpha,
                 lora_init)


class ImageViT(nn.Module):
    """A Vision Transformer (transformers' ViT) on [0, 1] images: ``forward(x)`` -> logits (B, K)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def vit(shape=(3, 32, 32), num_classes=10, *, patch=4, width=128, layers=2, heads=4, dropout=0.0) -> nn.Module:
    """A ViT classifier for (C, H, W) inputs cut into ``patch`` x ``patch`` patches, with learned
    position embeddings (random init). APRIL's closed form (:mod:`gradleak.attacks.april`)."""
    transformers = offline_transformers()
    channels, height, side = (int(v) for v in shape)
    patch = check_int("patch", patch, 1, 256)
    if height != side or side % patch:
        raise ConfigError(f"vit: the image side {side} must be square and a multiple of patch {patch}")
    width, layers, heads, _, _ = _sizes(width, layers, heads, 2, 2)
    config = transformers.ViTConfig(image_size=side, patch_size=patch, num_channels=channels, hidden_size=width,
                                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * width,
                                    num_labels=int(num_classes), hidden_dropout_prob=float(dropout),
                                    attention_probs_dropout_prob=float(dropout), attn_implementation="eager")
    return ImageViT(transformers.ViTForImageClassification(config))


def hf_model(path: str | os.PathLike, num_classes: int | None = None) -> tuple[nn.Module, str]:
    """``(model, loss)`` from a local ``save_pretrained`` folder: a causal LM (architecture
    ``*LMHeadModel``/``*ForCausalLM``, loss ``causal_lm``) or a sequence classifier
    (``*ForSequenceClassification``, loss ``cross_entropy``). Safetensors weights only."""
    from ..data._files import existing_dir, read_json

    folder = existing_dir(path, "hf model")
    config = read_json(folder / "config.json", "hf model config", 4 * 2**20)
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise ConfigError(f"hf model {str(folder)!r}: config.json names no architectures (save it with save_pretrained)")
    arch = architectures[0]
    transformers = offline_transformers()
    if arch.endswith(("LMHeadModel", "ForCausalLM")):
        loader, wrap, loss = transformers.AutoModelForCausalLM, CausalLM, "causal_lm"
    elif arch.endswith("ForSequenceClassification"):
        loader, wrap, loss = transformers.AutoModelForSequenceClassification, SequenceClassifier, "cross_entropy"
    else:
        raise ConfigError(f"hf model {str(folder)!r}: architecture {short_repr(arch)} is neither a causal LM nor a "
                          "sequence classifier")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"hf model {str(folder)!r}: no safetensors weights (gradleak never loads pickled weights)")
    try:
        net = loader.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                     trust_remote_code=False, attn_implementation="eager")
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"hf model {str(folder)!r}: cannot load ({type(error).__name__}: {one_line(error, 200)})") from None
    return wrap(net), loss
