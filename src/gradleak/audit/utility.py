"""What an audit trains besides attacking: the models with a ``train`` plan (once, before the
cells) and, per defense entry, the federated training that measures the accuracy the defense
costs (the ``utility`` plan). Both are stored in the audit folder and reused when their key
is unchanged."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..client import ClientSetup
from ..errors import GradleakError
from .config import AuditConfig, stable_hash
from .results import defense_label, numbers, stored_record

__all__ = ["train_models", "run_utility", "stored_utility"]


def train_models(config: AuditConfig, out: Path, context: dict[str, Any], progress, resume: bool) -> None:
    """Train every model that has a ``train`` plan once, before the cells; store its weights in
    ``OUT/models/<label>-<hash>/`` (reused when the same plan was stored before) and let the
    cells start from them (``context["weights"]``)."""
    from ..training import train_model

    for model in config.models:
        if model.train is None:
            continue
        plan, request = model.training(config.data, config.seed)
        key = {"model": {"name": model.name, "options": model.options}, "plan": plan.to_json(),
               "data": request.to_json(), "dtype": config.dtype}
        folder = out / "models" / (re.sub(r"[^A-Za-z0-9_.+-]", "_", model.name) + "-" + stable_hash(key))
        stored = stored_record(folder / "key.json", key) if resume else None
        if stored is None or not (folder / "weights.safetensors").is_file():
            task = progress.add_task(f"training {model.label}", total=plan.epochs)
            spec = model.spec(seed=config.seed, dtype=config.dtype, device=str(context["device"]))
            result = train_model(spec, request, plan, folder, quiet=True,
                                 progress=lambda done, total: progress.update(task, completed=done))
            progress.remove_task(task)
            if result.interrupted:
                raise KeyboardInterrupt
            atomic_write_json(folder / "key.json", {"key": key, "result": {"held_out_accuracy":
                                                                            result.held_out_accuracy}})
        context["weights"][model.label] = str(folder / "weights.safetensors")


def _utility_record(stack: list[Any], config: AuditConfig, out: Path) -> tuple[dict[str, Any], Path]:
    """The key of one utility training and the file that stores it."""
    key = {"utility": vars(config.utility) | {}, "defenses": [d.describe() for d in stack], "client": config.client,
           "seed": config.seed}
    defense = "+".join(d.name for d in stack) or "none"
    return key, out / "utility" / f"{defense}-{stable_hash(key)}.json"


def stored_utility(stack: list[Any], config: AuditConfig, out: Path) -> dict[str, Any] | None:
    """The stored result of the utility training of ``stack``, if one was made from the same key."""
    key, path = _utility_record(stack, config, out)
    stored = stored_record(path, key)
    return None if stored is None else numbers(stored["result"])


def run_utility(stack: list[Any], config: AuditConfig, out: Path, progress, resume: bool) -> dict[str, Any]:
    """Federated training under the defense entry ``stack`` (the audit's ``utility`` plan): its
    accuracy, stored in ``OUT/utility/`` (reused when ``resume`` and stored from the same key)."""
    from ..data import load_dataset
    from ..federated import split_dataset, train_federated
    from ..models import MODELS, build_model

    u = config.utility
    key, path = _utility_record(stack, config, out)
    stored = stored_utility(stack, config, out) if resume else None
    if stored is not None:
        return stored
    client = {**config.client, **{k: v for k, v in (("protocol", u.protocol), ("lr", u.lr), ("local_steps", u.local_steps),
                                                    ("local_batch_size", u.local_batch_size)) if v is not None}}
    task = progress.add_task(f"utility: {defense_label(stack)}", total=u.rounds)
    try:
        dataset = load_dataset(u.data, size=u.size)
        train, test = split_dataset(dataset, u.test_fraction, seed=config.seed)
        net = build_model(u.model, tuple(train.images.shape[1:]), len(dataset.classes), seed=config.seed,
                          **u.model_options)
        setup = ClientSetup(**{**client, "seed": config.seed})
        result = train_federated(net, train, test, clients=u.clients, rounds=u.rounds, setup=setup, defenses=stack,
                                 server_lr=u.server_lr, loss=MODELS[u.model].loss, seed=config.seed,
                                 eval_every=u.eval_every,
                                 progress=lambda done, total: progress.update(task, completed=done)).to_json()
    except GradleakError as error:
        result = {"accuracy": None, "error": str(error), "defenses": [d.describe() for d in stack]}
    finally:
        progress.remove_task(task)
    atomic_write_json(path, {"key": key, "result": result})
    return result
