"""Name -> class registries for the methods a config or the CLI can name (attacks, defenses).

Filled once, at import, by class decorators; nothing changes them afterwards, so they hold
no run state. A second class under a name already taken is refused rather than silently
replacing the first.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(dict, Generic[T]):
    """A ``dict`` of name -> class with a decorator to fill it and a lookup that names the choices.

    ``kind`` ("attack", "defense") words the errors; ``check(cls)`` returns a problem (a string)
    or None before a class is accepted."""

    def __init__(self, kind: str, check: Callable[[T], str | None] | None = None):
        super().__init__()
        self.kind = kind
        self._check = check

    def register(self, cls: T) -> T:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered as {self.kind}")
        problem = self._check(cls) if self._check else None
        if problem:
            raise ConfigError(f"{cls.__name__}: {problem}")
        if name in self and self[name] is not cls:
            raise ConfigError(f"{self.kind} name {name!r} is taken by {self[name].__qualname__}; "
                              f"{cls.__qualname__} needs another")
        self[name] = cls
        return cls

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(sorted(self))}") from None
