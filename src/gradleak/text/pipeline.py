"""Text runs end to end: simulate text clients on real sentences, attack their updates as the
server sees them, score against the truth and write the run folder. The CLI (``gradleak
attack --model gpt2 --data corpus``) is a thin layer over :func:`attack_text`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..attacks.malicious import MaliciousAttack
from ..client import ClientSetup
from ..errors import ConfigError
from ..models import ModelSpec
from .corpus import load_text, load_tokenizer
from .runs import TextRunResult, load_text_truth, write_text_run  # noqa: F401 (load_text_truth: importable here)

__all__ = ["attack_text", "capture_text", "text_updates", "text_metadata", "save_text_truth"]


def text_metadata(length: int, tokenizer, task: str) -> dict[str, Any]:
    """What a text update says about its inputs (never the tokens): sequence length, vocabulary
    size and the tokenizer's digest, the task."""
    import hashlib

    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return {"length": int(length), "vocab_size": int(tokenizer.get_vocab_size()), "tokenizer_sha256": digest,
            "task": task}


def text_updates(built, ids: torch.Tensor, labels: torch.Tensor, setup: ClientSetup, defenses: Any, tokenizer):
    """Each client's update as the server sees it (``defenses`` applied), with the text metadata."""
    from ..defenses import defended_updates

    from ..defenses import make_defenses

    targets = ids if built.loss == "causal_lm" else labels
    stack = make_defenses(defenses)
    try:
        served = defended_updates(built.module, ids, targets, setup, stack, loss=built.loss,
                                  model_info=built.description())
    except (RuntimeError, NotImplementedError, ValueError) as error:
        private = [d.name for d in stack if d.private_training() is not None]
        if not private:
            raise
        from ..errors import one_line

        raise ConfigError(f"{private[0]}: Opacus cannot compute per-example gradients of {type(built.module.net).__name__} "
                          f"({type(error).__name__}: {one_line(error, 160)})") from None
    meta = text_metadata(ids.shape[1], tokenizer, built.module.task)
    for d in served:
        d.update = replace(d.update, extra={**dict(d.update.extra), "text": meta})
    return served


def vocab_of(module) -> int | None:
    size = getattr(getattr(getattr(module, "net", None), "config", None), "vocab_size", None)
    return None if size is None else int(size)


def public_text(length: int, tokenizer, vocab: int | None, n: int = 64) -> torch.Tensor | None:
    """What a malicious server has of the clients' kind of text: up to ``n`` sequences of ``length``
    tokens from the built-in corpus's **train** topics (never the held-out ones the clients hold), or
    None when the corpus has none that long or its tokens do not fit the model's vocabulary."""
    from ..errors import DataError

    try:
        available = len(load_text("corpus-train", n=None, length=length, tokenizer=tokenizer))
        text = load_text("corpus-train", n=min(n, available), length=length, tokenizer=tokenizer)
    except DataError:
        return None
    return None if vocab is not None and int(text.ids.max()) >= vocab else text.ids


def check_vocabulary(module, ids: torch.Tensor) -> None:
    """Refuse token ids beyond the model's embedding (another tokenizer than the model's)."""
    size = getattr(getattr(getattr(module, "net", None), "config", None), "vocab_size", None)
    if size is not None and int(ids.max()) >= int(size):
        raise ConfigError(f"token id {int(ids.max())} is beyond the model's vocabulary of {size}: the tokenizer is "
                          "not the model's (pass --model-option vocab=N or the model's tokenizer)")


def save_text_truth(path: str | Path, ids: torch.Tensor) -> Path:
    """The true token ids of a captured update, apart from it (evaluation only)."""
    from safetensors.torch import save as safetensors_save

    from .._io import atomic_write_bytes

    return atomic_write_bytes(path, safetensors_save({"true_tokens": ids.to(torch.int64).contiguous().cpu()}))


def capture_text(out: str | Path, *, data: str = "corpus", n: int = 1, length: int = 16, start: int = 0,
                 model: ModelSpec, client: ClientSetup, truth: str | Path | None = None, tokenizer: Any = None):
    """One text client's update file (and, apart, its true tokens)."""
    from ..update_file import save_update

    tokenizer = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, (str, Path)) else tokenizer
    text = load_text(data, n=n, length=length, start=start, tokenizer=tokenizer)
    built = model.build((length,), len(text.classes))
    check_vocabulary(built.module, text.ids)
    (served,) = text_updates(built, text.ids.to(built.device), text.labels.to(built.device), client, None, tokenizer)
    save_update(served.update, out)
    if truth is not None:
        save_text_truth(truth, text.ids)
    return served.update


def attack_text(attack: str, out: str | Path, *, data: str = "corpus", n: int = 8, length: int = 16, start: int = 0,
                model: ModelSpec | str = "gpt2", client: ClientSetup | None = None, threat: Any = None,
                options: dict[str, Any] | None = None, defenses: Any = None, quiet: bool = False,
                save_updates: bool = False, tokenizer: Any = None) -> TextRunResult:
    """``n`` sequences of ``length`` tokens of real text (``data``: ``corpus`` = the held-out
    topics of the built-in corpus, or a text file) split into clients by ``client`` (FedSGD,
    batch 1 by default), each trained on ``model`` and defended by ``defenses``; each update
    attacked with ``attack`` under ``threat``; scored and written to ``out``."""
    from ..pipeline import attack_with_residuals, make_attack
    from ..threat import ThreatModel
    from ..update_file import save_update

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    if spec.modality != "text" and not spec.is_factory:
        raise ConfigError(f"model {spec.name!r} is an image model; text data needs gpt2, gpt2-classifier, bert, "
                          "hf:FOLDER or a factory returning a gradleak.text model")
    tokenizer = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, (str, Path)) else tokenizer
    text = load_text(data, n=n, length=length, start=start, tokenizer=tokenizer)
    built = spec.build((length,), len(text.classes))
    if getattr(built.module, "task", None) is None:
        raise ConfigError(f"model {spec.name!r} is not a text model (gradleak.text.models)")
    vocab = tokenizer.get_vocab_size()
    check_vocabulary(built.module, text.ids)
    ids, labels = text.ids.to(built.device), text.labels.to(built.device)
    setup = client or ClientSetup(seed=spec.seed)
    threat = threat or ThreatModel(labels_known=setup.share_labels)
    attacker = make_attack(attack, built.module, threat, dict(options or {}))
    sent = built
    if isinstance(attacker, MaliciousAttack):   # the clients train on the model the server sends
        threat = replace(threat, server="malicious")
        attacker = make_attack(attack, built.module, threat, dict(options or {}))
        module = attacker.serve(built.module, (length,), public_text(length, tokenizer, vocab_of(built.module)))
        sent = replace(built, module=module)
    served = text_updates(sent, ids, labels, setup, defenses, tokenizer)
    updates = [d.update for d in served]
    out = Path(out)
    if save_updates:
        for k, update in enumerate(updates):
            save_update(update, out / "updates" / f"client-{k:02d}.safetensors")
    reconstruction, residuals = attack_with_residuals(attacker, updates, quiet=quiet)
    kept = [i for d in served[: reconstruction.updates] for i in d.indices]
    config = {"data": {"name": text.name, "n": n, "length": length, "start": start, "vocab_size": vocab},
              "model": built.description(), "model_spec": spec.to_json(), "client": setup.to_json(),
              "threat": threat.to_json(), "threat_model": threat.sok(attacker),
              "defenses": [str(d) for d in (defenses or [])], "updates": len(updates)}
    return write_text_run(out, reconstruction, truth=text.ids[kept], tokenizer=tokenizer, config=config,
                          residuals=residuals)
