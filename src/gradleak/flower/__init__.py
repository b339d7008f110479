"""Flower integration: audit the updates a real federated system exchanges.

- :class:`LeakageAuditStrategy` wraps a Flower Message-API strategy (``FedAvg`` and the
  like) and audits, round by round and client by client, what the server could
  reconstruct from each train reply, and why (it never changes the aggregate);
- :func:`leakage_gate` is a client mod that attacks the client's own update before it is
  sent and blocks it or defends it above a PSNR threshold;
- :func:`training_metrics` / :func:`training_config` / :func:`protocol_of`: the contract
  that tells the server how a client trained (learning rate, epochs or steps, batch size);
- :func:`explain`: the analyser's verdict for the protocol a client actually ran;
- :func:`write_report`: the audit as HTML, figures and JSON.

Needs the ``flower`` extra (``pip install 'gradleak[flower]'``: ``flwr[simulation]==1.42.0``).
See ``docs/flower.md`` and ``examples/flower_audit/``.
"""

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError("gradleak.flower needs Flower: pip install 'gradleak[flower]' (flwr[simulation]==1.42.0)") from error

from ._reply import metrics_without_audit
from .arrays import delta_update, record_tensors
from .attacks import AttackOutcome, run_attack
from .contract import ClientProtocol, protocol_of, read_training_config, training_config, training_metrics
from .explain import Explanation, explain
from .gate import leakage_gate
from .records import AuditRecord
from .report import write_report
from .strategy import LeakageAuditStrategy

__all__ = ["LeakageAuditStrategy", "AuditRecord", "leakage_gate", "training_metrics", "training_config",
           "read_training_config", "protocol_of", "ClientProtocol", "explain", "Explanation", "write_report",
           "delta_update", "record_tensors", "run_attack", "AttackOutcome", "metrics_without_audit"]
