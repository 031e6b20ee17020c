"""A small generic registry: the single source of truth for divergences, methods, benchmarks and profiles.

Lookups accept canonical keys, registered aliases, and spelling variants that differ only in case and in
``-``/``_``/space. Unknown keys raise :class:`UnknownKeyError` with a did-you-mean suggestion and the full list
of valid choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from flat_ray.errors import FlatRayError

T = TypeVar("T")


class UnknownKeyError(FlatRayError, KeyError):
    """Raised for a key that is neither a canonical key nor an alias."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


def _fold(key: str) -> str:
    return key.strip().lower().replace("-", "_").replace(" ", "_")


class Registry(Generic[T]):
    """Maps canonical keys (and aliases) to objects.

    >>> r = Registry("colour"); r.register("red", 1, aliases=("rouge",))
    1
    >>> r["Rouge"], r.canonical("RED")
    (1, 'red')
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, key: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T:
        if key in self._items:
            raise ValueError(f"{self.kind} {key!r} is already registered")
        self._items[key] = obj
        for name in (key, *aliases):
            for variant in (name, _fold(name)):
                owner = self._aliases.setdefault(variant, key)
                if owner != key:
                    raise ValueError(f"{self.kind} alias {name!r} already points to {owner!r}")
        return obj

    def canonical(self, key: str) -> str:
        """Return the canonical key for ``key`` or raise :class:`UnknownKeyError`."""
        if not isinstance(key, str):
            raise UnknownKeyError(f"{self.kind} must be a string, got {key!r}; valid choices: {self.choices()}")
        found = self._aliases.get(key) or self._aliases.get(_fold(key))
        if found is None:
            pool = list(self._aliases)
            close = difflib.get_close_matches(key, pool, n=1, cutoff=0.6) or difflib.get_close_matches(
                _fold(key), pool, n=1, cutoff=0.6
            )
            hint = f" Did you mean {self._aliases[close[0]]!r}?" if close else ""
            raise UnknownKeyError(f"unknown {self.kind} {key!r}.{hint} Valid choices: {self.choices()}")
        return found

    def choices(self) -> str:
        return ", ".join(self._items)

    def __getitem__(self, key: str) -> T:
        return self._items[self.canonical(key)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._aliases or _fold(key) in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def aliases(self) -> dict[str, str]:
        """Every accepted spelling (excluding case folds) mapped to its canonical key."""
        return dict(self._aliases)
