"""What the text attacks need to know of a transformer, by role, not by position: the token
embedding, the input of each block's attention projection, and the gradient of that
projection's weight. GPT-2 (decoder, pre-LayerNorm: block k's projection ``c_attn`` sees
``ln_1(h_k)``) and BERT (encoder, post-LayerNorm: block k's ``query``/``key``/``value`` see
``h_k``, the embeddings' LayerNorm included), each with or without LoRA adapters (``peft``).

Everything is functional: the tensors (weights at the round, frozen base weights) are passed
in, the module is never modified.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..errors import AttackNotApplicable

__all__ = ["TransformerView"]


class TransformerView:
    """Roles in a :class:`~gradleak.text.models.CausalLM`/``SequenceClassifier`` (GPT-2 or BERT)."""

    def __init__(self, model: nn.Module):
        net = getattr(model, "net", None)
        if net is None or getattr(model, "task", None) is None:
            raise AttackNotApplicable(f"{type(model).__name__} is not a gradleak text model (gradleak.text.models)",
                                      condition="a GPT-2 or BERT text model")
        self.model = model
        self.lora = hasattr(net, "base_model") and hasattr(net, "peft_config")
        self.prefix = "net.base_model.model." if self.lora else "net."
        self.hf = net.base_model.model if self.lora else net
        self.kind = self.hf.config.model_type
        if self.kind not in ("gpt2", "bert"):
            raise AttackNotApplicable(f"model type {self.kind!r}: the text attacks know gpt2 and bert",
                                      condition="a GPT-2 or BERT text model")
        self.decoder = self.kind == "gpt2"
        self.width = int(self.hf.config.hidden_size)
        self.layers = int(self.hf.config.num_hidden_layers)
        self.vocab = int(self.hf.config.vocab_size)
        self.task = model.task

    # ------------------------------------------------------------------ names
    @property
    def embedding_name(self) -> str:
        return self.prefix + ("transformer.wte.weight" if self.decoder else "bert.embeddings.word_embeddings.weight")

    def block(self, k: int) -> str:
        return self.prefix + (f"transformer.h.{k}" if self.decoder else f"bert.encoder.layer.{k}")

    def projections(self, k: int) -> list[str]:
        """The attention projections of block ``k`` (module paths)."""
        if self.decoder:
            return [f"{self.block(k)}.attn.c_attn"]
        return [f"{self.block(k)}.attention.self.{p}" for p in ("query", "key", "value")]

    # --------------------------------------------------------------- calling
    def _call(self, path: str, tensors: Mapping[str, torch.Tensor], *args, **kwargs):
        module = self.model.get_submodule(path)
        start = path + "."
        own = {name[len(start):]: t for name, t in tensors.items() if name.startswith(start)}
        return functional_call(module, own, args, kwargs or None, strict=False)

    def embed(self, tensors: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """h_0: (N, m, d) the embedding output (GPT-2: token + position; BERT: LayerNorm of
        token + position + segment 0). ``ids`` may be token ids (N, m) or token embeddings
        (N, m, d) standing for the table's rows (what TAG and LAMP optimise)."""
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        if self.decoder:
            base = self.prefix + "transformer"
            words = ids if ids.is_floating_point() else self._call(f"{base}.wte", tensors, ids)
            return words + self._call(f"{base}.wpe", tensors, positions)[None]
        if ids.is_floating_point():
            return self._call(self.prefix + "bert.embeddings", tensors, inputs_embeds=ids)
        return self._call(self.prefix + "bert.embeddings", tensors, ids)

    def token_inputs(self, tensors: Mapping[str, torch.Tensor], position: int, tokens: torch.Tensor) -> torch.Tensor:
        """(V, d): the input of block 0's attention projection for each of ``tokens`` standing at
        ``position`` (what a decoder's first layer sees of it; for an encoder as well, since the
        embeddings act on each position alone)."""
        if self.decoder:
            base = self.prefix + "transformer"
            h = self._call(f"{base}.wte", tensors, tokens) + self._call(
                f"{base}.wpe", tensors, torch.tensor([position], device=tokens.device))
            return self._call(f"{self.block(0)}.ln_1", tensors, h)
        emb = self.prefix + "bert.embeddings"
        h = (self._call(f"{emb}.word_embeddings", tensors, tokens)
             + self._call(f"{emb}.position_embeddings", tensors, torch.tensor([position], device=tokens.device))
             + self._call(f"{emb}.token_type_embeddings", tensors, torch.zeros(1, dtype=torch.long,
                                                                               device=tokens.device)))
        return self._call(f"{emb}.LayerNorm", tensors, h)

    def layer_inputs(self, tensors: Mapping[str, torch.Tensor], ids: torch.Tensor, k: int) -> torch.Tensor:
        """(N, m, d): the input of block ``k``'s attention projection for sequences ``ids`` (N, m)."""
        h = self.embed(tensors, ids)
        mask = None
        if self.decoder:   # a block called alone gets no causal mask from its model: give it one
            m = ids.shape[1]
            mask = torch.full((m, m), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
        for j in range(k):
            out = self._call(self.block(j), tensors, h, None, mask) if self.decoder else \
                self._call(self.block(j), tensors, h)
            h = out[0] if isinstance(out, tuple) else out
        return self._call(f"{self.block(k)}.ln_1", tensors, h) if self.decoder else h

    # -------------------------------------------------------------- gradients
    def projection_gradient(self, gradient: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                            k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(M, A)``: a (d_in, m) matrix whose columns span the inputs of block ``k``'s attention
        projection (as far as the gradient reveals them), and the map ``A`` (r, d_in) into the
        space where that holds (None: the input space itself).

        Full weights: y = x W (+ b), so dL/dW = X^T dL/dY: its columns lie in the span of the
        inputs x. LoRA, y = x W0 + s (x A^T) B^T: dL/dA = s (dL/dY B)^T X lies in the same span
        (rank <= r); when B = 0 (peft's initialisation) dL/dA = 0 and dL/dB = s dL/dY^T (X A^T)
        spans the projected inputs x A^T."""
        blocks = []
        for path in self.projections(k):
            if self.lora:
                a = gradient.get(f"{path}.lora_A.default.weight")
                if a is None:
                    continue
                blocks.append(a.T)
            else:
                g = gradient[f"{path}.weight"]
                blocks.append(g if self.decoder else g.T)   # Conv1D weight is (in, out); Linear (out, in)
        if not blocks:
            raise AttackNotApplicable(f"block {k}: the update holds no gradient of an attention projection",
                                      condition="the update trains block k's attention projection")
        matrix = torch.cat(blocks, dim=1)
        if self.lora and bool(matrix.abs().max() == 0):
            path = self.projections(k)[0]
            b = gradient[f"{path}.lora_B.default.weight"]        # (d_out, r)
            return b.T, tensors[f"{path}.lora_A.default.weight"]  # span of (x A^T): test A x
        return matrix, None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, m, d) -> (N, heads, m, d / heads)."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)


def decoder_prefix_cache(view: TransformerView, tensors, ids: torch.Tensor):
    """Keys and values of block 0 of a decoder for prefixes ``ids`` (N, m): (N, H, m, hd) each."""
    x = view.layer_inputs(tensors, ids, 0)
    qkv = view._call(view.projections(0)[0], tensors, x)
    _, k, v = qkv.split(view.width, dim=-1)
    heads = int(view.hf.config.num_attention_heads)
    return _heads(k, heads), _heads(v, heads)


def decoder_extend(view: TransformerView, tensors, h0: torch.Tensor, x0: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block 0 of a GPT-2 decoder at one new position for N candidates, given each one's prefix
    keys/values (N, H, m, hd): ``h0`` (N, d) the new position's embedding, ``x0`` = ln_1(h0).
    Returns the input of block 1's projection at that position (N, d) and the new key and value
    (N, H, 1, hd). Causal attention makes this exact: position m attends to 0..m only."""
    heads = int(view.hf.config.num_attention_heads)
    block = view.block(0)
    qkv = view._call(view.projections(0)[0], tensors, x0[:, None])
    q, k, v = (_heads(t, heads) for t in qkv.split(view.width, dim=-1))
    keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
    weights = torch.softmax(q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    attended = (weights @ values).transpose(1, 2).reshape(h0.shape[0], 1, view.width)
    h = h0[:, None] + view._call(f"{block}.attn.c_proj", tensors, attended)
    h = h + view._call(f"{block}.mlp", tensors, view._call(f"{block}.ln_2", tensors, h))
    return view._call(f"{view.block(1)}.ln_1", tensors, h)[:, 0], k, v
