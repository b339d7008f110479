"""The corrupted transformer of Decepticons (Fowl et al. 2022): the parameters a malicious server
sends so that every token a client trains on is written, alone, into the gradient of a
feed-forward layer, together with its position and the sequence it belongs to.

The architecture is the client's own (GPT-2 or BERT, as :class:`~gradleak.text.arch.TransformerView`
knows them); only parameter values change. The residual stream's d coordinates are cut into
four groups (:class:`Layout`): a *sentence* group S, a *position* group P, a *token* group T
and one *sink* coordinate. Each group's content is kept zero-mean within the group, so that a
LayerNorm (which subtracts one mean over all d coordinates and divides by one scale) changes
every group by a common shift and a common factor only: centring a group again undoes the
shift, and ratios between groups survive.

- token embedding: each row keeps its original T coordinates (centred) and its sink value;
  position embedding: a random direction per position in P; BERT's segment embedding: zero;
  every LayerNorm the imprint sees: weight 1, bias 0;
- block 0's attention: zero queries and keys, so every token attends uniformly to the tokens
  it sees (the prefix in a decoder, the whole sequence in an encoder); the values map the T and
  P coordinates into S (random doubly-centred matrices): each token receives the mean over its
  visible tokens of f(v_j, j), a vector the attacker can compute for any token and position;
- the later blocks' attentions: off, but for a classifier's last block: uniform, moving only the
  sink coordinate (so that the loss, read at one position, reaches every position's sink);
- every imprint block's feed-forward layer: all units measure the same direction m
  (``a * m``, biases ``-a * c_i`` at increasing cuts placed on public text), so consecutive
  units differ by the tokens whose measurement falls between their cuts (Robbing the Fed's
  bins); its output layer writes every unit, with the same tiny weight, into the sink only,
  so the residual stream is unchanged but the gradient flows. ``a`` is large enough that the
  GELU acts as a step up to float precision for all but a small fraction of tokens
  (``sharpness``: the bins' width over GELU's transition).

A classifier's last block has no imprint (no attention after it would carry its gradient to
every position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AttackNotApplicable, ConfigError
from ..text.arch import TransformerView

__all__ = ["Layout", "layout_for", "corrupt_transformer", "imprint_blocks", "block_paths"]


@dataclass(frozen=True)
class Layout:
    """The coordinate groups of the corrupted residual stream."""

    width: int
    sentence: slice
    position: slice
    token: slice

    @property
    def sink(self) -> int:
        return self.width - 1


def layout_for(width: int, sentence_dims: int | None = None, position_dims: int | None = None) -> Layout:
    """S = [0, ks), P = [ks, ks + kp), T = [ks + kp, d - 1), the sink d - 1 (defaults: ks = max(8,
    d / 8), kp = max(8, d / 16)); T keeps at least 16 coordinates."""
    ks = sentence_dims if sentence_dims is not None else max(8, width // 8)
    kp = position_dims if position_dims is not None else max(8, width // 16)
    if ks < 2 or kp < 2 or width - 1 - ks - kp < 16:
        raise AttackNotApplicable(f"width {width} leaves no room for {ks} sentence, {kp} position and 16 token "
                                  "coordinates", condition="a model width of at least sentence_dims + position_dims + 17")
    return Layout(width, slice(0, ks), slice(ks, ks + kp), slice(ks + kp, width - 1))


def block_paths(view: TransformerView, k: int) -> dict[str, str]:
    """Module paths of block ``k`` by role: ``ln_attn`` (GPT-2), ``qkv`` (GPT-2) or ``query``/``key``/
    ``value`` (BERT), ``attn_out``, ``ln_mlp`` (the LayerNorm whose output the feed-forward sees),
    ``fc_in``, ``fc_out``, ``ln_out`` (BERT)."""
    b = view.block(k)
    if view.decoder:
        return {"ln_attn": f"{b}.ln_1", "qkv": f"{b}.attn.c_attn", "attn_out": f"{b}.attn.c_proj",
                "ln_mlp": f"{b}.ln_2", "fc_in": f"{b}.mlp.c_fc", "fc_out": f"{b}.mlp.c_proj"}
    return {"query": f"{b}.attention.self.query", "key": f"{b}.attention.self.key",
            "value": f"{b}.attention.self.value", "attn_out": f"{b}.attention.output.dense",
            "ln_mlp": f"{b}.attention.output.LayerNorm", "fc_in": f"{b}.intermediate.dense",
            "fc_out": f"{b}.output.dense", "ln_out": f"{b}.output.LayerNorm"}


def embedding_paths(view: TransformerView) -> dict[str, str]:
    if view.decoder:
        base = view.prefix + "transformer"
        return {"token": f"{base}.wte", "position": f"{base}.wpe"}
    base = view.prefix + "bert.embeddings"
    return {"token": f"{base}.word_embeddings", "position": f"{base}.position_embeddings",
            "segment": f"{base}.token_type_embeddings", "ln": f"{base}.LayerNorm"}


def weight_in_out(module: nn.Module) -> torch.Tensor:
    """A projection's weight as (in, out), whatever its class (``nn.Linear`` stores (out, in),
    GPT-2's ``Conv1D`` (in, out))."""
    return module.weight.T if isinstance(module, nn.Linear) else module.weight


def _set(module: nn.Module, weight_in_out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    target = module.weight
    target.copy_((weight_in_out.T if isinstance(module, nn.Linear) else weight_in_out).to(target))
    if module.bias is not None:
        module.bias.copy_(torch.zeros_like(module.bias) if bias is None else bias.to(module.bias))


def _unit_norm(module: nn.Module) -> None:
    module.weight.fill_(1.0)
    module.bias.zero_()


def _centre(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x - x.mean(dim, keepdim=True)


def imprint_count(view: TransformerView) -> int:
    """How many blocks carry an imprint: all for a causal LM, all but the last for a classifier."""
    return view.layers if view.task == "causal-lm" else view.layers - 1


def corrupt_transformer(model: nn.Module, layout: Layout, length: int, public: torch.Tensor | None, *,
                        sharpness: float, seed: int) -> dict[str, float]:
    """Set ``model``'s parameters (in place) to the corrupted transformer for sequences of ``length``
    tokens; ``public`` (P, length) token ids of text the server has place the bins. Returns the
    settings (bins, scale ``a``, sink weight)."""
    view = TransformerView(model)
    if view.lora:
        raise AttackNotApplicable("under LoRA only the attention adapters train: no feed-forward layer shares a "
                                  "gradient", condition="full fine-tuning (the feed-forward layers train)")
    if imprint_count(view) < 1:
        raise AttackNotApplicable("a classifier needs 2 or more blocks: the last block's attention carries the "
                                  "loss to every position", condition="2 or more transformer blocks (classifier)")
    if view.width != layout.width:
        raise ConfigError(f"layout for width {layout.width}, model width {view.width}")
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        scale = _embeddings(view, modules, layout, generator)
        for k in range(view.layers):
            _attention(view, modules, layout, k, generator, scale, length)
        h = int(weight_in_out(modules[block_paths(view, 0)["fc_in"]]).shape[1])
        measurement = torch.zeros(view.width, dtype=torch.float64)
        for group in (layout.sentence, layout.position, layout.token):   # each group an equal share of m
            part = _centre(torch.randn(group.stop - group.start, generator=generator, dtype=torch.float64))
            measurement[group] = part / part.norm()
        measurement /= measurement.norm()
        for k in range(view.layers):       # neutral feed-forward layers while the bins are measured
            _feed_forward(view, modules, k, None, None, 0.0)
        public = _public_or_random(view, public)
        inputs = _first_inputs(view, model, public)
        ratio = float(_centre(inputs[:, layout.sentence]).norm(dim=1).median()
                      / _centre(inputs[:, layout.token]).norm(dim=1).median())
        _scale_signature(view, modules, 1.0 / max(ratio, 1e-30))    # the signature as large as the token part
        values = _first_inputs(view, model, public) @ measurement
        mu, sigma = float(values.mean()), float(values.std().clamp_min(1e-12))
        blocks = imprint_count(view)
        count = blocks * (h - 1) + 1
        levels = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
        cuts = mu + sigma * torch.special.ndtri(levels)
        a = float(sharpness / (cuts[1:] - cuts[:-1]).min())
        sink = 1e-4 * scale / (a * h * (float(cuts[-1] - cuts[0]) + 8 * sigma))
        for k in range(view.layers):
            if k < blocks:
                _feed_forward(view, modules, k, a * measurement, cuts[k * (h - 1): k * (h - 1) + h] * a, sink)
            else:
                _feed_forward(view, modules, k, None, None, 0.0)
    return {"bins": float(count - 1), "scale": a, "sink_weight": sink, "measurement_mean": mu,
            "measurement_std": sigma}


def _embeddings(view, modules, layout: Layout, generator) -> float:
    """Token rows: T coordinates centred, the sink kept, S and P zero; positions: random directions in
    P with the tokens' median norm. Returns that norm."""
    paths = embedding_paths(view)
    tokens = modules[paths["token"]].weight
    t = _centre(tokens[:, layout.token].double())
    kept = torch.zeros_like(tokens, dtype=torch.float64)
    kept[:, layout.token] = t
    kept[:, layout.sink] = tokens[:, layout.sink].double()
    tokens.copy_(kept.to(tokens))
    scale = float(t.norm(dim=1).median())
    positions = modules[paths["position"]].weight
    p = _centre(torch.randn(positions.shape[0], layout.position.stop - layout.position.start, generator=generator,
                            dtype=torch.float64))
    p = scale * p / p.norm(dim=1, keepdim=True)
    placed = torch.zeros_like(positions, dtype=torch.float64)
    placed[:, layout.position] = p
    positions.copy_(placed.to(positions))
    if "segment" in paths:
        modules[paths["segment"]].weight.zero_()
        _unit_norm(modules[paths["ln"]])
    return scale


def _attention(view, modules, layout: Layout, k: int, generator, scale: float, length: int) -> None:
    """Block 0: uniform attention writing mean f(v_j, j) into S; a classifier's last block: uniform,
    sink only; the others: off (they write nothing)."""
    d = view.width
    paths = block_paths(view, k)
    value = torch.zeros(d, d, dtype=torch.float64)       # (in, out)
    out = torch.zeros(d, d, dtype=torch.float64)
    if k == 0:   # each token's contribution f(v, j) reads its token and its position (so two are never swapped)
        ks = layout.sentence.stop
        for group in (layout.token, layout.position):
            size = group.stop - group.start
            r = _centre(_centre(torch.randn(size, ks, generator=generator, dtype=torch.float64), 0), 1)
            value[group, layout.sentence] = r * (scale / math.sqrt(size * ks))
        out[layout.sentence, layout.sentence] = torch.eye(ks, dtype=torch.float64)
    elif k == view.layers - 1 and view.task != "causal-lm":
        # a classifier reads one position: its last attention spreads that position's sink to every position,
        # as strongly as the position's own path (the LayerNorm's sink is O(1), the residual's O(scale / sqrt(d)))
        value[layout.sink, layout.sink] = length * scale / math.sqrt(d)
        out[layout.sink, layout.sink] = 1.0
    if view.decoder:
        qkv = torch.zeros(d, 3 * d, dtype=torch.float64)
        qkv[:, 2 * d:] = value
        _set(modules[paths["qkv"]], qkv)
        _unit_norm(modules[paths["ln_attn"]])
    else:
        _set(modules[paths["query"]], torch.zeros(d, d))
        _set(modules[paths["key"]], torch.zeros(d, d))
        _set(modules[paths["value"]], value)
    _set(modules[paths["attn_out"]], out)
    _unit_norm(modules[paths["ln_mlp"]])


def _feed_forward(view, modules, k: int, direction, biases, sink: float) -> None:
    """Every unit ``direction`` with bias ``-biases[i]`` (None: zero), output ``sink`` into the sink."""
    paths = block_paths(view, k)
    fc_in, fc_out = modules[paths["fc_in"]], modules[paths["fc_out"]]
    d, h = weight_in_out(fc_in).shape
    if direction is None:
        _set(fc_in, torch.zeros(d, h))
    else:
        _set(fc_in, direction[:, None].expand(d, h), -biases)
    out = torch.zeros(h, d, dtype=torch.float64)
    out[:, d - 1] = sink
    _set(fc_out, out)
    if "ln_out" in paths:
        _unit_norm(modules[paths["ln_out"]])


def _public_or_random(view, public):
    if public is not None:
        return public
    length = int(view.hf.config.n_positions if view.decoder else view.hf.config.max_position_embeddings)
    return torch.randint(0, view.vocab, (64, min(32, length)), generator=torch.Generator().manual_seed(1))


def _first_inputs(view, model, public) -> torch.Tensor:
    """(tokens, d): the input of block 0's feed-forward layer for every token of ``public``."""
    seen: list[torch.Tensor] = []
    fc_in = model.get_submodule(block_paths(view, 0)["fc_in"])
    handle = fc_in.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model(public.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return seen[0].reshape(-1, view.width).double().cpu()


def _scale_signature(view, modules, factor: float) -> None:
    """Multiply what block 0's attention writes (the sequence signature) by ``factor``."""
    paths = block_paths(view, 0)
    module = modules[paths["qkv"] if view.decoder else paths["value"]]
    module.weight.mul_(factor)


def imprint_blocks(view: TransformerView, tensors) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The blocks whose feed-forward units all measure one direction: ``(k, direction a*m, cuts a*c)``,
    read from the weights at the round (so a captured update is attacked without the server's state)."""
    found = []
    for k in range(view.layers):
        path = block_paths(view, k)["fc_in"]
        module = view.model.get_submodule(path)
        w = tensors[f"{path}.weight"].double()
        w = w.T if isinstance(module, nn.Linear) else w                  # (in, units)
        b = tensors.get(f"{path}.bias")
        if b is None or not bool(w[:, 0].abs().max() > 0):
            continue
        if bool(((w - w[:, :1]).abs().max()) <= 1e-6 * w[:, 0].abs().max()):
            found.append((k, w[:, 0], -b.double()))
    return found
