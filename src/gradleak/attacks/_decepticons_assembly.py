"""Decepticons, second half: from the bins' inputs to token sequences (:mod:`.decepticons`).

Each bin's input u is tested against the served model's tables: centred, its token group is a
positive multiple of one token's row and its position group of one position's (a bin holding one
token), or the pair of groups is a combination of two (token, position) atoms with common
coefficients (a bin holding two tokens: the coefficients are the LayerNorm's and the gradient's
weights, shared by every group of a token's input, so the sentence group is ``c1 a1 + c2 a2``
with the same ``c``). A two-token bin is resolved when one of its tokens' signatures follows from
the sequence it sits in and the other's, ``(u_S - c1 a1) / c2``, then links to its own sequence
exactly. Sequences are then assembled from the signatures: chains of running means for a decoder,
groups of one signature for an encoder.
"""

from __future__ import annotations

import torch

from ..errors import AttackNotApplicable
from ..text.arch import TransformerView
from ._decepticons_model import block_paths, embedding_paths

__all__ = ["Roles", "centre", "closest", "split_mixtures", "resolve_mixtures", "chains", "groups"]


def centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def closest(vectors: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``vectors``: the row of ``table`` it is most parallel to (positive factor) and the
    relative distance to that direction (0 when it is that row times a positive number)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rows = table / table.norm(dim=1, keepdim=True).clamp_min(1e-300)
    best = torch.cat([(unit[i:i + 4096] @ rows.T).argmax(1) for i in range(0, unit.shape[0], 4096)])
    picked = rows[best]
    along = (unit * picked).sum(1, keepdim=True)
    distance = (unit - along * picked).norm(dim=1)
    return best, torch.where(along[:, 0] > 0, distance, torch.full_like(distance, 2.0))


class Roles:
    """What the attacker computes of the served model: each token's residual before block 0's attention
    (``base``) and what block 0's attention writes into S for a lone token (``feature``)."""

    def __init__(self, view: TransformerView, tensors, layout):
        self.view, self.tensors, self.layout = view, tensors, layout
        self.paths, self.embed = block_paths(view, 0), embedding_paths(view)
        self.device = next(iter(tensors.values())).device
        self._features: dict[int, torch.Tensor] = {}

    def base(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        call, t = self.view._call, self.tensors
        h = call(self.embed["token"], t, tokens) + call(self.embed["position"], t, positions)
        if self.view.decoder:
            return h
        return call(self.embed["ln"], t, h + call(self.embed["segment"], t, torch.zeros_like(tokens)))

    def atoms(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """(len(pairs), kp + kt): the centred position and token groups of each (token, position)."""
        tokens = torch.tensor([v for v, _ in pairs], device=self.device)
        base = self.base(tokens, torch.tensor([p for _, p in pairs], device=self.device))
        return torch.cat([centre(base[:, self.layout.position]), centre(base[:, self.layout.token])], 1)

    def feature(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        call, t, d = self.view._call, self.tensors, self.view.width
        base = self.base(tokens, positions)
        if self.view.decoder:
            value = call(self.paths["qkv"], t, call(self.paths["ln_attn"], t, base))[..., 2 * d:]
        else:
            value = call(self.paths["value"], t, base)
        return call(self.paths["attn_out"], t, value)[..., self.layout.sentence].double()

    def f(self, token: int, position: int) -> torch.Tensor:
        return self.feature(torch.tensor([token], device=self.device), torch.tensor([position], device=self.device))[0]

    def vocabulary(self, position: int) -> torch.Tensor:
        """f(v, position) for every token v (cached per position)."""
        if position not in self._features:
            every = torch.arange(self.view.vocab, device=self.device)
            self._features[position] = self.feature(every, torch.full_like(every, position))
        return self._features[position]

    def token_at(self, target: torch.Tensor, position: int, tolerance: float) -> int | None:
        table = self.vocabulary(position)
        distance = (table - target).norm(dim=1) / target.norm().clamp_min(1e-300)
        k = int(distance.argmin())
        return k if float(distance[k]) < tolerance else None


def _near(rows: list[tuple[int, torch.Tensor]], target: torch.Tensor, tolerance: float) -> int | None:
    """Index into ``rows`` ((token, a) pairs) of the one whose a equals ``target`` within tolerance."""
    if not rows:
        return None
    stacked = torch.stack([a for _, a in rows])
    distance = (stacked - target).norm(dim=1) / target.norm().clamp_min(1e-300)
    k = int(distance.argmin())
    return k if float(distance[k]) < tolerance else None


def _two_atoms(vector: torch.Tensor, table: torch.Tensor, tolerance: float) -> list[int]:
    """The one or two rows of ``table`` whose combination is ``vector`` (orthogonal matching pursuit)."""
    rows = table / table.norm(dim=1, keepdim=True).clamp_min(1e-300)
    first = int((rows @ vector).abs().argmax())
    rest = vector - (rows[first] @ vector) * rows[first]
    if float(rest.norm()) < tolerance * float(vector.norm()):
        return [first]
    score = (rows @ rest).abs()
    score[first] = -1
    return [first, int(score.argmax())]


def split_mixtures(u_p, u_t, u_s, token_table, position_table, roles: Roles, tolerance: float):
    """Bins holding two tokens: ``[(u_S, ((v1, p1, c1), (v2, p2, c2)))]``, each pair's position and token
    groups fitted together with common coefficients to a relative residual below ``tolerance``."""
    out = []
    for i in range(u_t.shape[0]):
        tokens = _two_atoms(u_t[i], token_table, tolerance)
        positions = _two_atoms(u_p[i], position_table, tolerance)
        if len(tokens) == 1 and len(positions) == 1:
            continue
        if len(tokens) == 2 and len(positions) == 2:
            hypotheses = [((tokens[0], positions[0]), (tokens[1], positions[1])),
                          ((tokens[0], positions[1]), (tokens[1], positions[0]))]
        elif len(tokens) == 2:
            hypotheses = [((tokens[0], positions[0]), (tokens[1], positions[0]))]
        else:
            hypotheses = [((tokens[0], positions[0]), (tokens[0], positions[1]))]
        target = torch.cat([u_p[i], u_t[i]])
        for pairs in hypotheses:
            atoms = roles.atoms(list(pairs)).T                                   # (kp + kt, 2)
            c = torch.linalg.lstsq(atoms, target[:, None]).solution[:, 0]
            if float((atoms @ c - target).norm()) < tolerance * float(target.norm()):
                out.append((u_s[i], ((*pairs[0], float(c[0])), (*pairs[1], float(c[1])))))
                break
    return out


def _add(entries, position: int, token: int, a: torch.Tensor, tolerance: float) -> None:
    rows = entries.setdefault(position, [])
    if _near([r for r in rows if r[0] == token], a, tolerance) is None:
        rows.append((token, a))


def resolve_mixtures(entries, mixtures, roles: Roles, tolerance: float) -> int:
    """Add the two tokens of every mixture whose signatures can be told (see the module docstring);
    ``entries`` ({position: [(token, a)]}) grows in place. Returns how many mixtures were resolved."""
    decoder, solved, open_ = roles.view.decoder, 0, list(mixtures)
    for _ in range(3):                              # a resolved pair can give the predecessor of another
        left = []
        for u_s, pair in open_:
            found = _resolve(entries, u_s, pair, roles, tolerance, decoder)
            if found is None:
                left.append((u_s, pair))
                continue
            for (v, p, _), a in zip(pair, found):
                _add(entries, p, v, a, tolerance)
            solved += 1
        if len(left) == len(open_):
            break
        open_ = left
    return solved


def _resolve(entries, u_s, pair, roles: Roles, tolerance: float, decoder: bool):
    signatures = None if decoder else _signatures(entries, tolerance)
    for k, o in ((0, 1), (1, 0)):
        (vk, pk, ck), (vo, po, co) = pair[k], pair[o]
        if decoder:
            fk = roles.f(vk, pk)
            known = [fk] if pk == 0 else [(pk * a + fk) / (pk + 1) for _, a in entries.get(pk - 1, [])]
        else:
            known = signatures
        for ak in known:
            ao = (u_s - ck * ak) / co
            if _valid(entries, ao, vo, po, roles, tolerance, signatures, partner=(vk, pk, ak)):
                return (ak, ao) if k == 0 else (ao, ak)
    return None


def _valid(entries, a, token, position, roles: Roles, tolerance: float, signatures, partner) -> bool:
    """Whether a token's signature ``a`` belongs to a sequence the alone tokens already show (or, in a
    decoder, follows its bin partner: two consecutive tokens of one sequence in one bin)."""
    if signatures is not None:                       # encoder: one of the sequences' signatures
        return _near([(0, s) for s in signatures], a, tolerance) is not None
    f = roles.f(token, position)
    if position == 0:
        return float((a - f).norm()) < tolerance * float(f.norm())
    previous = entries.get(position - 1, [])
    if partner[1] == position - 1:
        previous = [*previous, (partner[0], partner[2])]
    return _near(previous, ((position + 1) * a - f) / position, tolerance) is not None


def _signatures(entries, tolerance: float) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for rows in entries.values():
        for _, a in rows:
            if _near([(0, s) for s in found], a, tolerance) is None:
                found.append(a)
    return found


def chains(entries, roles: Roles, positions: int, batch: int | None, tolerance: float):
    """Decoder sequences of ``positions`` tokens: chains followed back from the entries nobody's chain
    reached, a_{p-1} = ((p + 1) a_p - f(v_p, p)) / p; one missing entry filled from the vocabulary."""
    claimed: dict[int, set[int]] = {p: set() for p in range(positions)}
    sequences, filled = [], 0
    for top in range(positions - 1, -1, -1):
        for k, (v, a) in enumerate(entries.get(top, [])):
            if k in claimed[top]:
                continue
            claimed[top].add(k)
            row, more = _follow(entries, roles, positions, top, v, a, claimed, tolerance)
            sequences.append(row)
            filled += more
    return keep(sequences, batch, [f"{len(sequences)} sequence(s) assembled by their running signatures (block 0's "
                                   f"attention); {filled} token(s) missing from the bins found from them"])


def _follow(entries, roles: Roles, positions: int, p: int, v: int, here: torch.Tensor, claimed, tolerance: float):
    """One chain from (token ``v`` at ``p``, signature ``here``) back to position 0 (or a break)."""
    row, filled = [-1] * positions, 0
    row[p] = v
    while p > 0:
        previous = ((p + 1) * here - roles.f(row[p], p)) / p
        rows = entries.get(p - 1, [])
        j = _near(rows, previous, tolerance)
        if j is not None:
            claimed[p - 1].add(j)
            row[p - 1], here, p = rows[j][0], rows[j][1], p - 1
            continue
        if p - 1 == 0:                                   # a_0 = f(v_0, 0)
            found = roles.token_at(previous, 0, tolerance)
            row[0] = -1 if found is None else found
            return row, int(found is not None)
        step = None
        for i, (_, a2) in enumerate(entries.get(p - 2, [])):
            found = roles.token_at(p * previous - (p - 1) * a2, p - 1, tolerance)
            if found is not None:
                step = (i, found)
                break
        if step is None:
            break
        claimed[p - 2].add(step[0])
        row[p - 1], row[p - 2] = step[1], entries[p - 2][step[0]][0]
        here, p, filled = entries[p - 2][step[0]][1], p - 2, filled + 1
    return row, filled


def groups(entries, roles: Roles, length: int, batch: int | None, tolerance: float):
    """Encoder sequences: tokens sharing one signature a; one missing token completes n * a."""
    found: list[tuple[torch.Tensor, dict[int, int]]] = []
    for p, rows in entries.items():
        for v, a in rows:
            j = _near([(0, g[0]) for g in found], a, tolerance)
            if j is None:
                found.append((a, {p: v}))
            else:
                found[j][1].setdefault(p, v)
    sequences, filled = [], 0
    for a, tokens in found:
        row = [tokens.get(p, -1) for p in range(length)]
        missing = [p for p in range(length) if row[p] < 0]
        if len(missing) == 1:
            known = [p for p in range(length) if row[p] >= 0]
            rest = length * a - roles.feature(torch.tensor([row[p] for p in known], device=roles.device),
                                              torch.tensor(known, device=roles.device)).sum(0)
            token = roles.token_at(rest, missing[0], tolerance)
            if token is not None:
                row[missing[0]], filled = token, filled + 1
        sequences.append(row)
    return keep(sequences, batch, [f"{len(sequences)} sequence(s) grouped by their signature (block 0's attention "
                                   f"over the whole sequence); {filled} token(s) missing from the bins found from it"])


def keep(sequences, batch, notes):
    sequences.sort(key=lambda row: -sum(t >= 0 for t in row))
    if batch is not None and len(sequences) > batch:
        notes.append(f"{len(sequences)} partial sequences for a batch of {batch}: the {batch} most complete kept")
        sequences = sequences[:batch]
    if not sequences:
        raise AttackNotApplicable("no bin holds a single token: nothing to assemble",
                                  condition="tokens alone in their bins")
    return torch.tensor(sequences, dtype=torch.long), notes
