"""Where batches of work run. `LocalBackend` runs them here, one after another; the Ray backend
(`distributed.py`) runs the same functions on workers that each hold the model. Work functions take
(model, item) and live at module level, so a worker process can import them by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from .loading import LoadedModel


class Backend(Protocol):
    def map(self, function: Callable[[LoadedModel, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """(index, function(model, items[index])) for every item, in whatever order they finish."""


class LocalBackend:
    def __init__(self, model: LoadedModel):
        self.model = model

    def map(self, function: Callable[[LoadedModel, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, function(self.model, item)
