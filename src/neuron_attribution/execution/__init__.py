"""Where batches of work run. `LocalBackend` runs them here, one after another; the Ray backend (`ray.py`) runs
the same functions on workers that each hold the model. A work function takes (model, settings, item) and
lives at module level, so a worker process can import it by name. Every backend carries the command's
`Settings`, and hands them to each function it runs: a worker never falls back on defaults of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from ..model.loaded import LoadedModel
from ..settings import ModelSpec, Settings

WorkFunction = Callable[[LoadedModel, Settings, Any], Any]
SetupFunction = Callable[[LoadedModel, Settings, Callable[[int, int], None] | None], None]


class Backend(Protocol):
    settings: Settings

    def map(self, function: WorkFunction, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """(index, function(model, settings, items[index])) for every item, in whatever order they finish."""

    def on_every_model(self, function: SetupFunction, progress: Callable[[int, int], None] | None = None) -> None:
        """Run function(model, settings, progress) once on every copy of the model (a slow one-off preparation,
        such as a pass over the weights, before the batches). `progress` is called where the work is visible."""


def settings_for(model: LoadedModel, settings: Settings | None = None) -> Settings:
    """The settings a call runs with: those given, else defaults naming the model as it was loaded."""
    if settings is not None:
        return settings
    return Settings(model=model.spec or ModelSpec(name=model.name))


class LocalBackend:
    def __init__(self, model: LoadedModel, settings: Settings | None = None):
        self.model = model
        self.settings = settings_for(model, settings)

    def map(self, function: WorkFunction, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, function(self.model, self.settings, item)

    def on_every_model(self, function: SetupFunction, progress: Callable[[int, int], None] | None = None) -> None:
        function(self.model, self.settings, progress)
