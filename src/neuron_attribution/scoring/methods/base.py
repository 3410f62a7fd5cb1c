"""The interface every FFN-neuron attribution method implements, and the registry that lists them.

A method is one class: a `key` (its name on the command line and in results), a one-line `description` (the
CLI's help text), and `scores(ctx)` / `top(ctx, k)`. Defining the class registers it; nothing else is edited.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from ...registry import Registry
from ...settings import DEFAULT_IG_STEPS
from ..context import ValueContext
from ..ranks import VocabularyRanks, ranks_for
from ..topk import rank_by_score

if TYPE_CHECKING:
    from ...model.loaded import LoadedModel

# key -> method class, in the order the classes were defined (the order of `all` and of result tables).
METHODS: Registry[type[FfnScorer]] = Registry("methods")


@dataclass
class MethodResources:
    """What a method may need besides the scoring context: the model (methods that run it again), the seed of
    random controls, and the vocabulary ranks of every FFN value vector (built once per model, on demand)."""

    model: LoadedModel
    seed: int = 0
    ig_steps: int = DEFAULT_IG_STEPS

    def ranks(self) -> VocabularyRanks:
        return ranks_for(self.model)


class FfnScorer(ABC):
    """Scores every FFN neuron for one prompt and target: higher = more important."""

    key: ClassVar[str]
    description: ClassVar[str]
    static: ClassVar[bool] = True  # False: runs the model again (slower)
    in_all: ClassVar[bool] = True  # part of `--methods all`
    needs_ranks: ClassVar[bool] = False  # reads VocabularyRanks (a pass over the weights, done once)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.__dict__.get("key")
        if key is not None:
            METHODS.register(key, cls)

    @classmethod
    def create(cls, resources: MethodResources) -> FfnScorer:
        return cls()

    @abstractmethod
    def scores(self, ctx: ValueContext) -> Tensor:
        """(L, N) score of every FFN neuron."""

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        """Flat indices (layer·N + neuron) of the k best neurons, best first, ties to the lower index."""
        flat = self.scores(ctx).reshape(-1)
        return rank_by_score(flat)[:k]
