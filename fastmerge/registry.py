"""A registry of named plug-ins (alignment methods, same-init merge methods): the single source of
the names the API accepts, the CLI offers and the demo and bench iterate, in registration order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from .errors import InvalidArgumentError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """{name: item} of the items registered so far; `kind` names them in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Adds `item` under its `name`; a second item of the same name is an error."""
        name = item.name
        if name in self._items:
            raise InvalidArgumentError(f"a {self.kind} named {name!r} is already registered")
        self._items[name] = item
        return item

    def lookup(self, name: str) -> T:
        """The item called `name`; InvalidArgumentError listing the choices when there is none."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise InvalidArgumentError(f"unknown {self.kind} {name!r}; choose one of {tuple(self._items)}") from None

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
