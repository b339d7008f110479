"""Decepticons (Fowl, Geiping, Reich, Wen, Czaja, Goldblum, Goldstein, "Decepticons: Corrupted
Transformers Breach Privacy in Federated Learning for Language Models", ICLR 2023, arXiv
2201.12675): a malicious server sends a transformer whose parameters (not its architecture)
are set so that the gradient of its feed-forward layers holds every token the client trained
on, alone, as Robbing the Fed's imprint holds images; token and position embeddings live in
separate coordinates so each recovered vector says which token stood where, and the first
attention layer writes a sequence signature into a third group of coordinates so the tokens
can be put back into their sequences.

The corrupted model is described in :mod:`._decepticons_model`. Its gradient gives, for each
bin between consecutive cuts holding one token s (Robbing the Fed's difference of adjacent
units of one block, the GELU acting as a step up to float precision),

    (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = u_s,

the feed-forward layer's input for s: a LayerNorm of (token v, position p, sentence part a).
Centring each coordinate group undoes the LayerNorm's shift; the T group is then proportional
to the token's embedding and the P group to the position's, exactly (a relative distance of
float precision to one row, ~1 to every other); a bin shared by several tokens is a mixture
and fails those tests. The S group, rescaled by the token's own T norm, is the attention
output a: the mean of f(v_j, j) over the tokens s attends to, f known to the attacker for any
token and position. An encoder (BERT) attends to the whole sequence: every token of a sequence
carries the same a, which groups them (one missing token is the one whose f completes n * a).
A decoder (GPT-2) attends to the prefix: a_p = mean_{j <= p} f(v_j, j), so the entry at p
names its predecessor's a_{p-1} = ((p + 1) a_p - f(v_p, p)) / p; chains are followed back from
the last position, a missing entry filled when the vocabulary holds the one f that links to an
entry two positions back. A causal LM's last tokens (targets only: no gradient reaches their
inputs) come from the final LayerNorm's gradient, as the span attack finds them.

Differences from the paper: the paper keeps the embeddings and separates sequences by the first
token's embedding copied through the first attention (approximate, with an assignment step);
here the groups are exact subspaces and the sequence signature is the running mean, so every
step is an exact test. Conditions: a malicious server (``ThreatModel(server="malicious")``);
a GPT-2 or BERT text model trained fully (not LoRA adapters only), of width >= ``sentence_dims``
+ ``position_dims`` + 17, a classifier with 2 or more blocks; one FedSGD gradient or one local
step. Tokens alone in their bin come back exactly; with N tokens in a batch and K bins (4 d - 1
per imprint block), about N exp(-N / K) of them are alone.
"""

from __future__ import annotations

import copy
import time

import torch

from ..errors import AttackNotApplicable, ConfigError
from ..limits import check_bool, check_float, check_int
from ..text.arch import TransformerView
from ._decepticons_assembly import Roles, centre, chains, closest, groups, resolve_mixtures, split_mixtures
from ._decepticons_model import block_paths, corrupt_transformer, embedding_paths, imprint_blocks, layout_for
from ._span import default_tolerance
from .base import Reconstruction, register_attack
from .malicious import MaliciousAttack

__all__ = ["Decepticons", "bin_inputs"]


def bin_inputs(weight_grad: torch.Tensor, bias_grad: torch.Tensor, top: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(vectors, bins, signals)``: the input of each bin between consecutive units whose bias
    gradients differ (units sorted by cut; ``weight_grad`` (in, units)), the bins, and their bias
    difference (the sum of their tokens' backward signals); ``top``: the last unit is the open top bin."""
    dw = weight_grad[:, :-1] - weight_grad[:, 1:]
    db = bias_grad[:-1] - bias_grad[1:]
    if top:
        dw, db = torch.cat([dw, weight_grad[:, -1:]], 1), torch.cat([db, bias_grad[-1:]])
    floor = 64 * torch.finfo(bias_grad.dtype).eps * float(bias_grad.abs().max())
    bins = torch.nonzero(db.abs() > floor).flatten()
    return (dw[:, bins] / db[bins]).T, bins, db[bins]


@register_attack
class Decepticons(MaliciousAttack):
    """Decepticons (Fowl et al. 2022): the server corrupts a transformer's parameters so that its
    feed-forward gradients hold each token alone with its position and a sequence signature; tokens
    alone in their bin come back exactly and are put back into their sequences. Options:
    ``sentence_dims``, ``position_dims`` (coordinates given to the sequence signature and the
    positions; defaults d/8 and d/16), ``sharpness`` (bin width over GELU's transition; default
    1e4: about 0.2 % of tokens fall near a cut and mix), ``seed``, ``tolerance`` (relative distance
    accepted as equal; default 1e-3 in float32, 1e-7 in float64), ``last_token`` (a causal LM's last
    tokens from the final LayerNorm's gradient)."""

    name = "decepticons"
    paper = "Fowl et al., Decepticons: Corrupted Transformers Breach Privacy in FL for Language Models, ICLR 2023 (arXiv 2201.12675)"
    conditions = ("malicious server sending corrupted parameters of a GPT-2/BERT text model trained fully (not LoRA); "
                  "a FedSGD gradient or one local step; tokens alone in a bin come back exactly")
    surrogate_data = True      # public text places the bins: SoK threat model G

    def __init__(self, model, threat=None, *, sentence_dims: int | None = None, position_dims: int | None = None,
                 sharpness: float = 1e4, seed: int = 0, tolerance: float | None = None, last_token: bool = True):
        super().__init__(model, threat)
        self.sentence_dims = None if sentence_dims is None else check_int("sentence_dims", sentence_dims, 2, 65536)
        self.position_dims = None if position_dims is None else check_int("position_dims", position_dims, 2, 65536)
        self.sharpness = check_float("sharpness", sharpness, low=1.0, high=1e8)
        self.seed = check_int("seed", seed, 0, 2**31)
        self.tolerance = None if tolerance is None else check_float("tolerance", tolerance, low_open=True, high=1.0)
        self.last_token = check_bool("last_token", last_token)
        self.settings: dict[str, float] = {}

    def options(self):
        return {**super().options(), "sentence_dims": self.sentence_dims, "position_dims": self.position_dims,
                "sharpness": self.sharpness, "seed": self.seed, "tolerance": self.tolerance,
                "last_token": self.last_token}

    def serve(self, model, input_shape, public):
        """A corrupted copy of ``model`` (the client's text model; never modified); ``public``: token ids
        (P, n) of text the server has (the built-in corpus's train topics), or None (random tokens)."""
        self._require_malicious()
        served = copy.deepcopy(model)
        view = TransformerView(served)
        if len(tuple(input_shape)) != 1:
            raise ConfigError(f"decepticons serves text models: input shape (length,), got {tuple(input_shape)}")
        if public is not None and (public.is_floating_point() or public.dim() != 2):
            raise ConfigError(f"decepticons: public text is (sequences, length) token ids, got {public.dtype} "
                              f"{tuple(public.shape)}")
        layout = layout_for(view.width, self.sentence_dims, self.position_dims)
        self.settings = corrupt_transformer(served, layout, int(tuple(input_shape)[0]), public, sharpness=self.sharpness,
                                            seed=self.seed)
        self.model = served
        return served

    # ------------------------------------------------------------------ the attack
    def _reconstruct(self, update):
        self._require_malicious()
        started = time.perf_counter()
        view = TransformerView(self.model)
        gradient = {n: g.double() for n, g in update.as_gradient().items()}
        params, buffers = self.parameters_at_round(update)
        tensors = {n: t.double() if t.is_floating_point() else t for n, t in {**buffers, **params}.items()}
        dtype = next(iter(update.tensors.values())).dtype
        tolerance = self.tolerance or default_tolerance(dtype)
        layout = layout_for(view.width, self.sentence_dims, self.position_dims)
        length, causal = int(update.input_shape[0]), update.loss == "causal_lm"
        roles = Roles(view, tensors, layout)
        with torch.no_grad():
            entries, mixtures, records, counts = self._entries(view, gradient, tensors, roles, length, tolerance)
            solved = resolve_mixtures(entries, mixtures, roles, tolerance)
            if view.decoder:
                tokens, more = chains(entries, roles, length - 1 if causal else length, update.batch_size, tolerance)
            else:
                tokens, more = groups(entries, roles, length, update.batch_size, tolerance)
            notes = [f"{counts['bins']} bins hold inputs: {counts['alone']} one token exactly (token and position "
                     f"found), {len(mixtures)} two or three tokens ({solved} told apart by their sequences' signatures), "
                     f"{counts['bins'] - counts['alone'] - len(mixtures)} more (set aside)", *more]
            if causal:
                tokens, more = self._last(view, tensors, gradient, tokens, update.batch_size, tolerance, records, roles)
                notes += more
        notes.append(f"{tokens.shape[0]} sequence(s) of {length} tokens in {time.perf_counter() - started:.2f} s")
        history = {"tokens per position": [float((tokens[:, i] >= 0).sum()) for i in range(tokens.shape[1])]}
        return Reconstruction(images=None, tokens=tokens.cpu(), notes=notes, history=history)

    def _entries(self, view, gradient, tensors, roles, length, tolerance):
        """Every bin's input tested: ``{position: [(token, a)]}`` for the bins holding one token, the bins
        holding two (:func:`split_mixtures`) and counts."""
        blocks = imprint_blocks(view, tensors)
        if not blocks:
            raise AttackNotApplicable("no feed-forward layer whose units all measure one direction: the model the "
                                      "client trained is not the one decepticons serves",
                                      condition="the client trained the corrupted transformer decepticons serves")
        vectors, signals, block_of = [], [], []
        for i, (k, _, _) in enumerate(blocks):
            path = block_paths(view, k)["fc_in"]
            weight = gradient.get(f"{path}.weight")
            if weight is None:
                raise AttackNotApplicable(f"the update holds no gradient of {path} (frozen, or LoRA adapters only)",
                                          condition="the feed-forward layers train")
            weight = weight.T if weight.shape[0] != view.width else weight           # (in, units)
            found, _, signal = bin_inputs(weight, gradient[f"{path}.bias"], top=i == len(blocks) - 1)
            vectors.append(found)
            signals.append(signal)
            block_of += [k] * found.shape[0]
        u, signal = torch.cat(vectors), torch.cat(signals)
        layout = roles.layout
        embed = embedding_paths(view)
        token_table = centre(tensors[f"{embed['token']}.weight"][:, layout.token])
        position_table = centre(tensors[f"{embed['position']}.weight"][:length, layout.position])
        u_t, u_p, u_s = centre(u[:, layout.token]), centre(u[:, layout.position]), centre(u[:, layout.sentence])
        token, token_distance = closest(u_t, token_table)
        position, position_distance = closest(u_p, position_table)
        alone = (token_distance < tolerance) & (position_distance < tolerance)
        entries: dict[int, list[tuple[int, torch.Tensor]]] = {}
        records = []                # (block, token, position, signature, bias difference) of the bins of one token
        if bool(alone.any()):
            keep = torch.nonzero(alone).flatten()
            base = roles.base(token[keep], position[keep])
            scale = centre(base[:, layout.token]).norm(dim=1) / u_t[keep].norm(dim=1)
            a = u_s[keep] * scale[:, None]
            for j, v, p in zip(range(keep.numel()), token[keep].tolist(), position[keep].tolist()):
                records.append((block_of[int(keep[j])], v, p, a[j], float(signal[keep[j]])))
                rows = entries.setdefault(p, [])
                if not any(r[0] == v and float((r[1] - a[j]).norm()) < tolerance * float(a[j].norm()) for r in rows):
                    rows.append((v, a[j]))      # the same token twice (a shared prefix) once
        rest = torch.nonzero(~alone).flatten()
        mixtures = split_mixtures(u_p[rest], u_t[rest], u_s[rest], token_table, position_table, roles, tolerance)
        return entries, mixtures, records, {"bins": int(u.shape[0]), "alone": int(alone.sum())}

    def _last(self, view, tensors, gradient, tokens, batch, tolerance, records, roles):
        """A causal LM's last tokens: each sequence's from its own bin at position n - 2
        (:mod:`._decepticons_last`), the rest from the final LayerNorm's gradient when every other
        token of the batch is known (as the span attack finds them)."""
        last = torch.full((tokens.shape[0],), -1, dtype=tokens.dtype)
        notes: list[str] = []
        if self.last_token and tokens.shape[0] > 0 and batch is not None:
            from ._decepticons_last import sequence_last_tokens

            last, notes = sequence_last_tokens(view, tensors, tokens, records, roles, batch, tolerance)
        if self.last_token and bool((last < 0).any()):
            if bool((tokens >= 0).all()):
                from ._dager_last import last_tokens

                found, more = last_tokens(view, tensors, gradient, tokens, batch, tolerance)
                if found is not None:
                    last = torch.where(last < 0, found.to(last.dtype).cpu(), last)
                notes += more
            else:
                notes.append(f"last tokens of {int((last < 0).sum())} sequence(s) not recovered: their own bin was "
                             "not told, and some sequence has a position not recovered (the final LayerNorm's "
                             "gradient needs them all)")
        return torch.cat([tokens, last[:, None]], dim=1), notes
