"""Registries of swappable policies, keyed by the name a scenario YAML uses.

Adding a policy is one new function and one decorator::

    PLACEMENTS = Registry("placement")

    @PLACEMENTS.register("contiguous")
    def contiguous(...): ...

An unknown name fails with the list of valid names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moesim.errors import MoesimError

T = TypeVar("T")


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a message (a 10k-character name stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def closest(name: str, valid: list[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Generic[T]):
    """A name → implementation map for one policy family.

    Args:
        family: Human-readable family name used in error messages, e.g. ``"placement"``.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a duplicate name is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the implementation called ``name`` or raise with the valid names."""
        try:
            return self._items[name]
        except KeyError:
            valid = sorted(self._items)
            raise MoesimError(
                f"unknown {self.family} '{shorten(name)}'{closest(name, valid)}; "
                f"valid: {', '.join(valid)}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
