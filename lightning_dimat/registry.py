"""A small name → object registry, so YAML configs can name extension points.

Topologies, partition schemes, merge methods and models are each kept in a :class:`Registry`.
A config names an entry by its string key; a user adds one with the ``register`` decorator.

Examples:
    >>> from lightning_dimat.registry import Registry
    >>> COLOURS = Registry("colour")
    >>> @COLOURS.register("red")
    ... def red() -> str:
    ...     return "#f00"
    >>> COLOURS.get("red")()
    '#f00'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (case-insensitive, ``-`` and ``_`` alike) to registered objects.

    Args:
        kind: what the entries are, used in error messages (``"topology"``, ``"merge method"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def register(self, name: str, *aliases: str, override: bool = False) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` (and optional ``aliases``)."""

        def decorator(obj: T) -> T:
            self.add(name, obj, *aliases, override=override)
            return obj

        return decorator

    def add(self, name: str, obj: T, *aliases: str, override: bool = False) -> None:
        """Registers ``obj`` under ``name``; raises if the name is taken unless ``override=True``."""
        key = self._key(name)
        for candidate in (key, *map(self._key, aliases)):
            taken = candidate in self._entries or candidate in self._aliases
            if taken and not override:
                raise ValueError(
                    f"A {self.kind} named {candidate!r} is already registered; "
                    f"pass override=True to replace it."
                )
        self._entries[key] = obj
        for alias in aliases:
            self._aliases[self._key(alias)] = key

    def get(self, name: str) -> T:
        """Returns the entry for ``name``; raises a ``ValueError`` listing the known names otherwise."""
        if not isinstance(name, str):
            raise TypeError(
                f"A {self.kind} is named by a string, got {name!r} of type {type(name).__name__}."
            )
        key = self._key(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}. Known: {', '.join(self.names())}.")
        return self._entries[key]

    def names(self) -> list[str]:
        """The registered names (aliases excluded), sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
