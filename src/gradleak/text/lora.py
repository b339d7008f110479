"""LoRA adapters (Hu et al. 2021) with ``peft``: the client trains only the adapters and
shares only their gradients or deltas.

:func:`apply_lora` returns a *new* module (the user's model is deep-copied, never modified)
whose only parameters are the adapters ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r) of
the attention projections (GPT-2: ``c_attn``; BERT: ``query``, ``key``, ``value``); the frozen
base weights become buffers. So ``named_parameters()`` is exactly what a LoRA client sends,
and every part of gradleak (clients, update files, attacks) handles a LoRA model like any
other. ``init="trained"`` draws ``lora_B`` from N(0, 0.02^2) instead of peft's zeros, as the
adapters are after a first round of training (with B = 0 the gradient of A is zero).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..limits import check_float, check_int, short_repr

__all__ = ["apply_lora", "lora_targets", "is_lora"]

LORA_INITS = ("trained", "peft")


def lora_targets(net: nn.Module) -> list[str]:
    """The attention projections LoRA adapts in ``net`` (a Hugging Face model)."""
    kind = getattr(getattr(net, "config", None), "model_type", None)
    if kind == "gpt2":
        return ["c_attn"]
    if kind == "bert":
        return ["query", "key", "value"]
    raise ConfigError(f"LoRA: no known attention projections for model type {short_repr(kind)} (gpt2, bert)")


def is_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def _freeze_into_buffers(module: nn.Module) -> None:
    """Every parameter that does not train becomes a buffer of the module that holds it (tied
    weights stay tied: each holder gets the same tensor)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.requires_grad:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach())


def apply_lora(model: nn.Module, *, rank: Any, alpha: Any = None, init: str = "trained", seed: int = 0) -> nn.Module:
    """``model`` (a :class:`~gradleak.text.models.CausalLM`/``SequenceClassifier``) with LoRA
    adapters of rank ``rank`` (scaling ``alpha / rank``, default alpha = rank) on its attention
    projections; only the adapters are parameters."""
    from peft import LoraConfig, get_peft_model

    rank = check_int("lora_rank", rank, 1, 4096)
    alpha = float(rank if alpha is None else check_float("lora_alpha", alpha, low_open=True))
    if init not in LORA_INITS:
        raise ConfigError(f"lora_init must be one of {', '.join(LORA_INITS)}, got {short_repr(init)}")
    wrapped = copy.deepcopy(model)
    targets = lora_targets(wrapped.net)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=wrapped.net.config.model_type == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped.net = get_peft_model(wrapped.net, config)
        if init == "trained":
            for name, param in wrapped.net.named_parameters():
                if ".lora_B." in name:
                    with torch.no_grad():
                        param.normal_(0.0, 0.02)
    for name, param in wrapped.net.named_parameters():   # the classification head stays frozen too
        param.requires_grad_(".lora_" in name)
    _freeze_into_buffers(wrapped)
    return wrapped
