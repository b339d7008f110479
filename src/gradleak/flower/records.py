"""What the audit keeps per client and round (:class:`AuditRecord`), and the round's sum
under simulated secure aggregation (:func:`aggregate_record`).

Secure aggregation (Bonawitz et al. 2017) lets the server learn only the sum of the
clients' updates. FedAvg divides it by the known total of ``num-examples``, so the server
learns exactly the weighted mean ``sum_k n_k delta_k / sum_k n_k``, which is what is
attacked here, as gradleak's ``secure-aggregation`` defense does (in the clear). When every
client ran one local SGD step with the same learning rate from the same global weights,
that mean is exactly one SGD step on the union of their batches (the gradient of the
mean loss over all N examples), so the sum is attacked as a batch of N; with several
local steps it is not the delta of any one protocol, and attacking it as one step of the
union batch is an approximation, which the record says. The sum follows the rule of its
clients: when a client's number of examples, learning rate or local steps is unknown, the
sum's protocol is unknown too, and the record is explained (which client lacks what), never
attacked as if its protocol were known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import one_line
from ..models.spec import BuiltModel
from ..update import SharedUpdate
from .attacks import AttackOutcome, best_psnr, best_residual
from .contract import ClientProtocol
from .explain import Explanation

__all__ = ["AuditRecord", "aggregate_record", "skipped"]


def skipped(attack: str, why: str) -> AttackOutcome:
    return AttackOutcome(attack, "skipped", why)


@dataclass
class AuditRecord:
    """One audited reply (``node_id``) or one round's sum (``node_id`` None, ``kind``
    ``secure-aggregation``, ``clients`` summed). ``status``: ``audited``, ``no update`` (an
    error reply the strategy skipped, e.g. a gate that blocked) or ``error`` (the audit
    failed; ``message`` in one line). ``gate``: the client gate's ``gradleak-gate-*``
    metrics seen in the reply. ``update`` and ``truth`` stay in memory (not in the JSON)."""

    server_round: int
    node_id: int | None
    kind: str = "client"
    status: str = "audited"
    message: str = ""
    protocol: dict[str, Any] | None = None
    explanation: Explanation | None = None
    attacks: list[AttackOutcome] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    capture: str | None = None
    seconds: float = 0.0
    clients: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    update: SharedUpdate | None = None
    truth: tuple[torch.Tensor, torch.Tensor] | None = None
    sum_protocol: ClientProtocol | None = None
    client: str | None = None   # a display name, e.g. "client 2" from the reply's partition-id metric

    @property
    def who(self) -> str:
        """``client 2 (node 1357...)``, ``node 1357...`` or ``sum of 4 clients``."""
        if self.node_id is None:
            return f"sum of {len(self.clients)} clients"
        return f"{self.client} (node {self.node_id})" if self.client else f"node {self.node_id}"

    @property
    def best_psnr(self) -> float | None:
        return best_psnr(self.attacks)

    @property
    def best(self) -> AttackOutcome | None:
        """The attack whose reconstruction has the best update residual (certified first)."""
        return best_residual(self.attacks)

    @property
    def best_residual(self) -> float | None:
        """The lowest update residual of the audit's reconstructions (truth-free)."""
        best = self.best
        return None if best is None else best.residual_value

    @property
    def certified(self) -> bool:
        """Some attack's reconstruction reproduces the update to within the certified tolerance."""
        return any(o.certified for o in self.attacks)

    @property
    def verdict(self) -> str | None:
        return None if self.explanation is None else self.explanation.verdict

    def line(self) -> str:
        """One log line: round, client, verdict, what the attacks got."""
        who = self.who
        got = ", ".join(f"{o.attack} {o.psnr_mean:.1f} dB" if o.psnr_mean is not None else
                        f"{o.attack} residual {o.residual_value:.2g}" + (" CERTIFIED EXACT" if o.certified else "")
                        if o.residual_value is not None else f"{o.attack} {o.status}" for o in self.attacks)
        return (f"round {self.server_round}, {who}: {self.status}"
                + (f", {self.verdict}" if self.verdict else "") + (f"; {got}" if got else "")
                + (f" ({self.message})" if self.message else ""))

    def to_json(self) -> dict[str, Any]:
        return {"server_round": self.server_round, "node_id": self.node_id, "client": self.client, "kind": self.kind,
                "status": self.status,
                "message": self.message, "protocol": self.protocol,
                "explanation": None if self.explanation is None else self.explanation.to_json(),
                "attacks": [o.to_json() for o in self.attacks], "best_psnr": self.best_psnr,
                "best_residual": self.best_residual, "certified": self.certified, "gate": dict(self.gate),
                "capture": self.capture, "seconds": round(self.seconds, 3), "clients": list(self.clients),
                "notes": list(self.notes),
                "num_images": None if self.truth is None else int(self.truth[0].shape[0])}


def aggregate_record(server_round: int, audited: list[AuditRecord], built: BuiltModel) -> AuditRecord:
    """The round's weighted mean of the audited clients' deltas, as the server sees it under
    secure aggregation, with the protocol it is attacked as and notes saying how exact that is."""
    members = [r for r in audited if r.update is not None and r.status != "error"]
    record = AuditRecord(server_round, None, kind="secure-aggregation", clients=[r.node_id for r in members])
    fields = ("lr", "epochs", "local_steps", "batch_size", "num_examples", "mode")
    protocols = [ClientProtocol(**{k: v for k, v in (r.protocol or {}).items() if k in fields}) for r in members]
    if len(members) < 2:
        record.status, record.message = "error", f"{len(members)} client update(s) this round: nothing is summed"
        return record
    unknown = [f"node {r.node_id}: {', '.join(n for n in ('num_examples', 'lr', 'local_steps') if getattr(p, n) is None)}"
               for r, p in zip(members, protocols) if None in (p.num_examples, p.lr, p.local_steps)]
    if unknown:
        record.notes.append(f"the protocol of {len(unknown)} of the {len(members)} summed clients is unknown "
                            f"({'; '.join(unknown)} unknown): so is the sum's, which is not attacked as if it were known")
        return record
    sizes = [p.num_examples for p in protocols]
    lrs = [p.lr for p in protocols]
    total = sum(sizes)
    tensors = {n: sum(u.update.tensors[n].double() * (k / total) for u, k in zip(members, sizes)).to(built.dtype)
               for n in members[0].update.tensors}
    lr = sum(l * k for l, k in zip(lrs, sizes)) / total
    steps = sorted({p.local_steps for p in protocols}, key=lambda s: (s is None, s))
    record.notes.append(f"secure aggregation, simulated as gradleak's secure-aggregation defense does: the server "
                        f"learns only the FedAvg-weighted mean of {len(members)} clients' deltas ({total} examples); "
                        "Flower's SecAgg+ runs only in its legacy workflow API, which this Message-API audit cannot "
                        "wrap")
    if steps == [1] and len(set(lrs)) == 1:
        record.notes.append(f"every client ran one local step with lr {lr:g}: the mean is exactly one SGD step on the "
                            f"union of the {total} examples")
    else:
        record.notes.append(f"clients ran {', '.join(map(str, steps))} local step(s) with lr "
                            f"{', '.join(f'{l:g}' for l in sorted(set(lrs)))}: the mean is not the delta of any one "
                            f"protocol; attacked as one step of the {total}-example union batch (an approximation)")
    record.sum_protocol = ClientProtocol(lr=lr, epochs=None, local_steps=1, batch_size=total, num_examples=total,
                                         mode=members[0].update.mode)
    first = members[0].update
    record.update = replace(first, tensors=tensors, batch_size=total if total <= 4096 else None, local_steps=1,
                            local_lr=lr, local_epochs=None, local_batch_size=total if total <= 4096 else None,
                            buffers=None, extra={"flower": {"server_round": server_round, "aggregated_clients":
                                                            record.clients, "exact": steps == [1] and
                                                            len(set(lrs)) == 1}})
    truths = [r.truth for r in members]
    if all(t is not None for t in truths):
        record.truth = torch.cat([t[0] for t in truths]), torch.cat([t[1] for t in truths])
    if not math.isfinite(lr):
        record.status, record.message = "error", one_line(f"learning rate {lr}")
    return record
