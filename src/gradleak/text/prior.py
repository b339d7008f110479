"""The language-model prior of LAMP (Balunović et al., NeurIPS 2022): a tiny GPT-2 trained on the
train topics of the built-in corpus (``scripts/train_text_prior.py``; shipped as
``assets/prior.safetensors``, float16), scoring how plausible a token sequence is as English
of that corpus. Its vocabulary is the built-in tokenizer's."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch

__all__ = ["PRIOR_OPTIONS", "language_prior", "prior_vocab", "sequence_nll"]

PRIOR_OPTIONS = {"width": 64, "layers": 2, "heads": 2, "positions": 256}


@lru_cache(maxsize=1)
def _prior_module():
    from safetensors.torch import load as safetensors_load

    from ..models import ModelSpec

    model = ModelSpec("gpt2", PRIOR_OPTIONS).build((32,)).module
    data = resources.files("gradleak.text").joinpath("assets/prior.safetensors").read_bytes()
    weights = safetensors_load(data)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name].float())
    return model.eval().requires_grad_(False)


def language_prior(dtype=torch.float32, device="cpu"):
    """The prior model (built once), in ``dtype`` on ``device``."""
    return _prior_module().to(dtype=dtype, device=device)


def prior_vocab() -> int:
    """The size of the prior's vocabulary (the built-in tokenizer's)."""
    return _prior_module().net.transformer.wte.num_embeddings


@torch.no_grad()
def sequence_nll(ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each row of ``ids`` (N, n) under the prior: (N,)."""
    model = language_prior(dtype, ids.device)
    logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.mean(1)
