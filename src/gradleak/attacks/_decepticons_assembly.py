"""Decepticons, second half: from the bins' inputs to token sequences (:mod:`.decepticons`).

Each bin's input u is tested against the served model's tables: centred, its token group is a
positive multiple of one token's row and its position group of one position's (a bin holding one
token), or the pair of groups is a combination of two (token, position) atoms with common
coefficients (a bin holding two or three tokens: the coefficients are the LayerNorm's and the
gradient's weights, shared by every group of a token's input, so the sentence group is
``c1 a1 + c2 a2 (+ c3 a3)`` with the same ``c``). Such a bin is resolved when all but one of its
tokens' signatures follow from the sequences they sit in and the last one's, ``(u_S - sum of the
others) / c``, then links to its own sequence exactly. Sequences are then assembled from the signatures: chains of running means for a decoder,
groups of one signature for an encoder.
"""

from __future__ import annotations

import itertools
import math

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
    step = max(1, 2**24 // max(1, rows.shape[0]))            # ~128 MiB of float64 similarities at a time
    best = torch.cat([(unit[i:i + step] @ rows.T).argmax(1) for i in range(0, unit.shape[0], step)])
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
        self._single: dict[tuple[int, int], torch.Tensor] = {}

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
        """f(token, position), cached (the assembly asks for the same ones many times)."""
        key = (int(token), int(position))
        if key not in self._single:
            self._single[key] = self.feature(torch.tensor([token], device=self.device),
                                             torch.tensor([position], device=self.device))[0]
        return self._single[key]

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


MAX_MEMBERS = 3          # tokens sharing one bin that are told apart
MAX_COMBINATIONS = 2**12  # known signatures tried per mixture and member solved
MAX_MIXTURES = 2**13      # mixtures resolved per update (a crafted update cannot make the search unbounded)


def _atoms(vector: torch.Tensor, table: torch.Tensor, tolerance: float) -> list[int]:
    """Up to :data:`MAX_MEMBERS` rows of ``table`` whose combination is ``vector`` (orthogonal matching
    pursuit; stops when the fit is within ``tolerance``)."""
    rows = table / table.norm(dim=1, keepdim=True).clamp_min(1e-300)
    support: list[int] = []
    rest = vector
    for _ in range(MAX_MEMBERS):
        score = (rows @ rest).abs()
        if support:
            score[torch.tensor(support)] = -1
        support.append(int(score.argmax()))
        basis = rows[support].T
        rest = vector - basis @ torch.linalg.lstsq(basis, vector[:, None]).solution[:, 0]
        if float(rest.norm()) < tolerance * float(vector.norm()):
            break
    return support


def _hypotheses(tokens: list[int], positions: list[int]) -> list[tuple[tuple[int, int], ...]]:
    """Every set of (token, position) members using each token and each position, as many members as
    the larger of the two lists (2 or 3)."""
    m = max(len(tokens), len(positions))
    if m < 2:
        return []
    found = set()
    for ts in itertools.product(tokens, repeat=m):
        if set(ts) != set(tokens):
            continue
        for ps in itertools.product(positions, repeat=m):
            members = tuple(sorted(zip(ts, ps)))
            if set(ps) == set(positions) and len(set(members)) == m:
                found.add(members)
    return sorted(found)


def split_mixtures(u_p, u_t, u_s, token_table, position_table, roles: Roles, tolerance: float):
    """Bins holding two or three tokens: ``[(u_S, ((v, p, c), ...))]``, the members' position and token
    groups fitted together with common coefficients to a relative residual below ``tolerance``."""
    out = []
    for i in range(u_t.shape[0]):
        target = torch.cat([u_p[i], u_t[i]])
        for members in _hypotheses(_atoms(u_t[i], token_table, tolerance), _atoms(u_p[i], position_table, tolerance)):
            atoms = roles.atoms(list(members)).T                                 # (kp + kt, m)
            c = torch.linalg.lstsq(atoms, target[:, None]).solution[:, 0]
            if float((atoms @ c - target).norm()) < tolerance * float(target.norm()):
                out.append((u_s[i], tuple((v, p, float(ck)) for (v, p), ck in zip(members, c))))
                break
    return out


def _add(entries, position: int, token: int, a: torch.Tensor, tolerance: float) -> None:
    rows = entries.setdefault(position, [])
    if _near([r for r in rows if r[0] == token], a, tolerance) is None:
        rows.append((token, a))


def resolve_mixtures(entries, mixtures, roles: Roles, tolerance: float) -> int:
    """Add the tokens of every mixture whose signatures can be told (see the module docstring);
    ``entries`` ({position: [(token, a)]}) grows in place. Returns how many mixtures were resolved."""
    decoder, solved, open_ = roles.view.decoder, 0, list(mixtures)[:MAX_MIXTURES]
    for _ in range(3):                              # a resolved mixture can give the predecessor of another
        left = []
        for u_s, members in open_:
            found = _resolve(entries, u_s, members, roles, tolerance, decoder)
            if found is None:
                left.append((u_s, members))
                continue
            for (v, p, _), a in zip(members, found):
                _add(entries, p, v, a, tolerance)
            solved += 1
        if len(left) == len(open_):
            break
        open_ = left
    return solved


def _known(entries, token: int, position: int, roles: Roles, signatures) -> list[torch.Tensor]:
    """The signatures a member can have given what is found: a decoder's from each entry one position
    back (or f at position 0), an encoder's the sequences' own."""
    if signatures is not None:
        return signatures
    f = roles.f(token, position)
    return [f] if position == 0 else [(position * a + f) / (position + 1) for _, a in entries.get(position - 1, [])]


def _resolve(entries, u_s, members, roles: Roles, tolerance: float, decoder: bool):
    """Signatures for every member: all but one from what is found, the last solved from u_S and checked."""
    signatures = None if decoder else _signatures(entries, tolerance)
    for o, (vo, po, co) in enumerate(members):
        others = [m for k, m in enumerate(members) if k != o]
        options = [_known(entries, v, p, roles, signatures) for v, p, _ in others]
        if math.prod(len(x) for x in options) > MAX_COMBINATIONS:
            continue
        for chosen in itertools.product(*options):
            ao = (u_s - sum(c * a for (_, _, c), a in zip(others, chosen))) / co
            partners = [(v, p, a) for (v, p, _), a in zip(others, chosen)]
            if _valid(entries, ao, vo, po, roles, tolerance, signatures, partners):
                found = list(chosen)
                found.insert(o, ao)
                return found
    return None


def _valid(entries, a, token, position, roles: Roles, tolerance: float, signatures, partners) -> bool:
    """Whether a token's signature ``a`` belongs to a sequence the alone tokens already show (or, in a
    decoder, follows a bin partner: consecutive tokens of one sequence in one bin)."""
    if signatures is not None:                       # encoder: one of the sequences' signatures
        return _near([(0, s) for s in signatures], a, tolerance) is not None
    f = roles.f(token, position)
    if position == 0:
        return float((a - f).norm()) < tolerance * float(f.norm())
    previous = [*entries.get(position - 1, []), *((v, b) for v, p, b in partners if p == position - 1)]
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
    reached, a_{p-1} = ((p + 1) a_p - f(v_p, p)) / p; one or two consecutive missing entries filled
    from the vocabulary."""
    claimed: dict[int, set[int]] = {p: set() for p in range(positions)}
    sequences, filled = [], 0
    budget = {"pairs": 4 * (batch or 64)}     # vocabulary-pair searches (each V x V): bounded per update
    for top in range(positions - 1, -1, -1):
        for k, (v, a) in enumerate(entries.get(top, [])):
            if k in claimed[top]:
                continue
            claimed[top].add(k)
            row, more = _follow(entries, roles, positions, top, v, a, claimed, tolerance, budget)
            sequences.append(row)
            filled += more
    return keep(sequences, batch, [f"{len(sequences)} sequence(s) assembled by their running signatures (block 0's "
                                   f"attention); {filled} token(s) missing from the bins found from them"])


def _follow(entries, roles: Roles, positions: int, p: int, v: int, here: torch.Tensor, claimed, tolerance: float,
            budget: dict[str, int]):
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
        shared = _shared_bin(entries, roles, p, previous, tolerance)
        if shared is not None:                           # its bin also held the same token of another sequence
            row[p - 1], here, p, filled = shared, previous, p - 1, filled + 1
            continue
        step = None
        for i, (_, a2) in enumerate(entries.get(p - 2, [])):
            found = roles.token_at(p * previous - (p - 1) * a2, p - 1, tolerance)
            if found is not None:
                step = (i, found)
                break
        if step is None:
            if budget["pairs"] <= 0:
                break
            budget["pairs"] -= 1
            jump = _two_missing(entries, roles, p, previous, claimed, tolerance)
            if jump is None:
                break
            if p == 2:                                   # positions 0 and 1 both missing: the chain's start
                row[0], row[1] = jump
                return row, filled + 2
            i, (v1, v2) = jump
            claimed[p - 3].add(i)
            row[p - 1], row[p - 2], row[p - 3] = v2, v1, entries[p - 3][i][0]
            here, p, filled = entries[p - 3][i][1], p - 3, filled + 2
            continue
        claimed[p - 2].add(step[0])
        row[p - 1], row[p - 2] = step[1], entries[p - 2][step[0]][0]
        here, p, filled = entries[p - 2][step[0]][1], p - 2, filled + 1
    return row, filled


def _shared_bin(entries, roles: Roles, p: int, previous: torch.Tensor, tolerance: float) -> int | None:
    """The token at p - 1 when its bin also held the same token at the same position of another
    sequence (the token and position tests pass, the signature is their mix): a token found at p - 1
    whose f links the known a_{p-1} to an entry at p - 2 (or to f at position 0)."""
    for token in sorted({v for v, _ in entries.get(p - 1, [])}):
        following = (p * previous - roles.f(token, p - 1)) / (p - 1)
        if p - 2 == 0:
            if roles.token_at(following, 0, tolerance) is not None:
                return token
        elif _near(entries.get(p - 2, []), following, tolerance) is not None:
            return token
    return None


def _two_missing(entries, roles: Roles, p: int, previous: torch.Tensor, claimed, tolerance: float):
    """Positions p - 1 and p - 2 both missing: f(v, p - 2) + f(w, p - 1) = p a_{p-1} - (p - 2) a_{p-3},
    searched over the vocabulary's pairs (meet in the middle), with a_{p-3} an entry no chain has
    claimed yet (the lower fragment of this sequence). Returns (v, w) at the start (p = 2), else
    (entry index at p - 3, (v, w)); None when no pair fits."""
    targets = [(None, p * previous)] if p == 2 else [
        (i, p * previous - (p - 2) * a) for i, (_, a) in enumerate(entries.get(p - 3, [])) if i not in claimed[p - 3]][:8]
    first, second = roles.vocabulary(p - 2), roles.vocabulary(p - 1)
    squares = (second ** 2).sum(1)
    step = max(1, 2**24 // second.shape[0])                  # ~128 MiB of distances at a time
    for i, target in targets:
        best, pair = float("inf"), (0, 0)
        for start in range(0, first.shape[0], step):
            rest = target[None] - first[start:start + step]                # what w must give
            distance = (rest ** 2).sum(1)[:, None] + squares[None] - 2 * rest @ second.T
            k = int(distance.argmin())
            if float(distance.flatten()[k]) < best:
                best, pair = float(distance.flatten()[k]), (start + k // second.shape[0], k % second.shape[0])
        v, w = pair
        if float((first[v] + second[w] - target).norm()) < tolerance * float(target.norm()):
            return (v, w) if i is None else (i, (v, w))
    return None


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
