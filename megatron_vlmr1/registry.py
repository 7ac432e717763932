"""One name → object table, used by every registry of the package (RL math, rewards, model families).

A duplicate name raises (naming who registered it first); an unknown name raises listing the known ones. The
owners wrap it with their own public functions (``get_reward``, ``get_policy_loss``, ``get_family``, ...), which
add what is particular to them, such as loading ``package.module:function`` paths.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from megatron_vlmr1.config import load_object

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry table for one kind of entry (``kind`` appears in every error message)."""

    def __init__(self, kind: str, allow_import_paths: bool = True, import_kind: str = "import path"):
        self.kind = kind
        self.allow_import_paths = allow_import_paths
        self.import_kind = import_kind  # how a bad ``package.module:function`` is named in its error
        self._entries: dict[str, T] = {}

    def _check_name(self, name: str) -> None:
        if not name or (self.allow_import_paths and ":" in name):
            raise ValueError(f"{self.kind} name {name!r} must be non-empty and contain no ':'")

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second entry under the same name raises."""
        self._check_name(name)
        if name in self._entries:
            owner = getattr(self._entries[name], "__module__", type(self._entries[name]).__module__)
            raise ValueError(f"{self.kind} {name!r} is already registered (by {owner})")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""
        self._check_name(name)

        def decorator(entry: T) -> T:
            return self.add(name, entry)

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or (when allowed) the callable at ``package.module:function``."""
        if self.allow_import_paths and ":" in name:
            entry = load_object(name, kind=self.import_kind)
            if not callable(entry):
                raise ValueError(f"{self.kind} {name!r} is not callable")
            return entry
        if name not in self._entries:
            hint = " (or give 'package.module:function')" if self.allow_import_paths else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}{hint}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests register throw-away entries in a copy)."""
        other: Registry[T] = Registry(self.kind, self.allow_import_paths, self.import_kind)
        other._entries = dict(self._entries)
        return other

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
