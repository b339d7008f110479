"""What every attack shares: the ``Reconstruction`` it returns, the ``Attack`` base
class with its one verb ``reconstruct``, and the registry of attacks by name.

An attack family is one module in :mod:`gradleak.attacks` that subclasses
:class:`Attack`, implements ``_reconstruct(update)`` and registers itself with
:func:`register_attack`. ``Attack.reconstruct`` first passes the update through the
threat model (:meth:`~gradleak.threat.ThreatModel.observe`), so an attack sees only what
the attacker is granted; ground truth never enters an attack.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from ..threat import ThreatModel
from ..update import SharedUpdate

__all__ = ["Reconstruction", "Attack", "Hooks", "ATTACKS", "register_attack", "get_attack", "require_single_sample"]


@dataclass
class Reconstruction:
    """What an attack recovered.

    images: (N, C, H, W) on the [0, 1] scale (de-normalized, not clamped), or None when the
        attack recovered no image (e.g. only the features entering an inner layer).
    labels: (N,) recovered labels, or None.
    features: recovered inputs of inner layers, keyed by layer name, each (N, features).
    history: curves over the attack's iterations (or units, for closed-form attacks):
        series name -> list of floats, or {"x": [...], "y": [...]}.
    notes: the conditions of the method that held or failed, in words.
    updates: how many updates this reconstruction covers (several after ``concat``; fewer
        than attacked when a run was interrupted).
    interrupted: Ctrl-C stopped the attack; the last update's result is the best found
        until then, not the attack's finished answer.
    tokens: (N, n) recovered token ids of a text attack (-1 where a position was not
        recovered), or None.
    """

    images: torch.Tensor | None
    labels: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    attack: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    updates: int = 1
    interrupted: bool = False
    tokens: torch.Tensor | None = None

    def __repr__(self) -> str:
        """Shapes and counts, never tensor values (``print(run)`` in a notebook stays short)."""
        shape = None if self.images is None else tuple(self.images.shape)
        parts = [f"attack={self.attack!r}", f"images={shape}",
                 f"labels={None if self.labels is None else self.labels.tolist()[:16]}",
                 f"updates={self.updates}", f"notes={len(self.notes)}"]
        if self.features:
            parts.append(f"features={ {k: tuple(v.shape) for k, v in self.features.items()} }")
        if self.interrupted:
            parts.append("interrupted=True")
        return f"Reconstruction({', '.join(parts)})"

    @property
    def num_samples(self) -> int:
        if self.tokens is not None:
            return self.tokens.shape[0]
        if self.images is not None:
            return self.images.shape[0]
        if self.features:
            return next(iter(self.features.values())).shape[0]
        return 0 if self.labels is None else self.labels.shape[0]

    @staticmethod
    def concat(parts: list["Reconstruction"]) -> "Reconstruction":
        """Join reconstructions of several updates (e.g. one per client) into one."""
        if not parts:
            raise ConfigError("Reconstruction.concat: nothing to join")
        images = None if any(p.images is None for p in parts) else torch.cat([p.images for p in parts])
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        shared = set.intersection(*(set(p.features) for p in parts))
        features = {k: torch.cat([p.features[k] for p in parts]) for k in sorted(shared)}
        history = {f"{k}[{i}]" if len(parts) > 1 else k: v for i, p in enumerate(parts) for k, v in p.history.items()}
        notes = [f"update {i}: {n}" if len(parts) > 1 else n for i, p in enumerate(parts) for n in p.notes]
        tokens = None if any(p.tokens is None for p in parts) else _cat_tokens([p.tokens for p in parts])
        return Reconstruction(images, labels, features, history, notes, parts[0].attack, parts[0].config,
                              sum(p.updates for p in parts), any(p.interrupted for p in parts), tokens)


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """Token rows of several updates, padded with -1 (not recovered) to the longest."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in parts])


@dataclass(frozen=True)
class Hooks:
    """Callbacks an iterative attack calls while it runs (both optional).

    monitor(images) -> {name: value}: called every few iterations with the current best
        images on the [0, 1] scale; its values are recorded in the history. This is how a
        report tracks PSNR against ground truth without the attack ever seeing it.
    progress(done, total): iterations done of the current run.
    """

    monitor: Callable[[torch.Tensor], dict[str, float]] | None = None
    progress: Callable[[int, int], None] | None = None


class Attack(abc.ABC):
    """Base class of every attack: ``Attack(model, threat, **options).reconstruct(update)``.

    ``model`` is the architecture the attacker has; the weights at the round are taken
    from ``update.weights`` when the update carries them, else from ``model`` itself.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    conditions: ClassVar[str] = ""
    surrogate_data: ClassVar[bool] = False      # uses public images (SoK threat models D, G)
    training_details: ClassVar[bool] = False    # uses the local training schedule beyond one step (SoK C)

    def __init__(self, model: nn.Module, threat: ThreatModel | None = None):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.threat = threat or ThreatModel()
        self._hooks = Hooks()

    def reconstruct(self, update: SharedUpdate, *, monitor: Callable[[torch.Tensor], dict[str, float]] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Reconstruction:
        """Reconstruct the client's inputs from ``update`` as the threat model allows.

        ``monitor`` and ``progress`` are optional :class:`Hooks` for iterative attacks. The
        model runs in the mode the update records (``train``: BatchNorm with the batch's
        statistics, as the client trained; ``eval``), and is left in its own mode afterwards.
        """
        update.validate_for(self.model)
        self._hooks = Hooks(monitor, progress)
        was_training = self.model.training
        if update.mode is not None:
            self.model.train(update.mode == "train")
        try:
            result = self._reconstruct(self.threat.observe(update))
        finally:
            self._hooks = Hooks()
            self.model.train(was_training)
        result.attack = result.attack or self.name
        result.config = {**self.options(), **result.config}
        return result

    def reconstruct_many(self, updates: Sequence[SharedUpdate], *,
                         monitors: Sequence[Callable[[torch.Tensor], dict[str, float]] | None] | None = None,
                         progress: Callable[[int, int], None] | None = None) -> Iterator[Reconstruction]:
        """Reconstruct independent updates (one client or image each), yielding one
        :class:`Reconstruction` per update, in order; ``monitors``: one per update (or None).
        Each result is what :meth:`reconstruct` gives for its update; attacks that can run
        several updates in one batched computation (gradient matching) override this. After
        Ctrl-C the results it cut short (marked ``interrupted``) are yielded, then no more."""
        check_monitors(monitors, updates)
        for k, update in enumerate(updates):
            result = self.reconstruct(update, monitor=None if monitors is None else monitors[k], progress=progress)
            yield result
            if result.interrupted:  # Ctrl-C: no further update is attacked
                return

    @abc.abstractmethod
    def _reconstruct(self, update: SharedUpdate) -> Reconstruction:
        """Subclasses: the attack proper, on the update as the attacker observes it."""

    def options(self) -> dict[str, Any]:
        """The attack's settings, for reports (JSON-safe)."""
        return {"attack": self.name, "threat": self.threat.to_json()}

    def parameters_at_round(self, update: SharedUpdate) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model's parameters as the client had them (from the update when it carries them) and its buffers."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        if update.weights is not None:
            params.update({n: w.to(params[n].dtype) for n, w in update.weights.items() if n in params})
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return params, buffers


def check_monitors(monitors: Sequence | None, updates: Sequence) -> None:
    """``reconstruct_many``'s monitors: None, or one per update."""
    if monitors is not None and len(monitors) != len(updates):
        raise ConfigError(f"monitors: one per update expected, got {len(monitors)} for {len(updates)} updates")


def require_single_sample(update: SharedUpdate, method: str) -> None:
    """Refuse an update that (by its metadata) averages several samples, for one-sample methods."""
    if update.batch_size is not None and update.batch_size > 1:
        from ..errors import AttackNotApplicable

        raise AttackNotApplicable(
            f"{method} reconstructs one sample, but the update averages {update.batch_size} samples "
            f"(a batch of {update.batch_size}), which mixes them",
            condition="batch size 1",
        )


ATTACKS: Registry[type[Attack]] = Registry("attack")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an attack available by its ``name`` (CLI, audits)."""
    return ATTACKS.register(cls)


def get_attack(name: str) -> type[Attack]:
    """The attack class registered as ``name``; a ConfigError listing the known names otherwise."""
    return ATTACKS.lookup(name)
