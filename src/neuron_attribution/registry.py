"""The one policy for every registry of the project (families, scoring methods, evaluation protocols, offline
models): a name is registered once; registering the same thing again (a module imported twice) is harmless;
a second, different thing under a taken name is a programming error, raised when it is defined."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict that refuses to rebind a name. `what` names the kind in the error ("adapters", "methods")."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, item: T) -> None:
        held = self.get(name)
        if held is not None and held is not item:
            raise TypeError(f"two {self.what} are registered as {name!r}: {held!r} and {item!r}")
        self[name] = item
