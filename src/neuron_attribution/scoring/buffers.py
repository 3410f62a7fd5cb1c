"""What scoring keeps between calls, owned by the model it was computed for: reused vocabulary-sized buffers and
bounded caches of weight-derived results. Held by the model's FFN weight stack (`LayerStack.derived`), so they
are released with the model (or when its weights are replaced: `forget_weights` makes a new stack) and one
model's entries can never reach another."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import Tensor

from ..errors import UserError
from ..model.weights import LayerStack
from ..settings import format_size


class Scratch:
    """Reused vocabulary-sized buffers. A fresh 100 MB tensor per batch costs more in page faults than the
    exp() over it; these are allocated once per thread and grown when a larger batch needs it: never beyond the
    largest batch a call's memory budget allowed, and released with the model that owns them."""

    def __init__(self):
        self._local = threading.local()

    def buffer(self, name: str, rows: int, columns: int, device: torch.device) -> Tensor:
        store = self._local.__dict__.setdefault("buffers", {})
        key = (name, device)
        held = store.get(key)
        if held is None or held.shape[1] != columns or held.shape[0] < rows:
            store.pop(key, None)  # the old buffer goes before the new one is made
            held = store[key] = torch.empty(rows, columns, device=device)
        return held[:rows]

    def held_bytes(self) -> int:
        """Bytes this thread's buffers hold."""
        return sum(t.numel() * t.element_size() for t in self._local.__dict__.get("buffers", {}).values())


class BoundedCache:
    """A mapping that forgets its least recently used entries beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    def get(self, key):
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# Vocabulary projections kept per model: (2k,) ids each, so 65,536 of them are a few MB.
PROJECTION_ENTRIES = 65_536


class ModelCaches:
    """Everything scoring keeps for one model between calls."""

    def __init__(self):
        self.scratch = Scratch()
        self.projections = BoundedCache(PROJECTION_ENTRIES)
        self.ranks = None  # VocabularyRanks, made on first use by `scoring/ranks.py`


def caches_for(stack: LayerStack) -> ModelCaches:
    """The caches of the model whose FFN weight stack (`adapter.ffn_value_stack`) is `stack`."""
    caches = stack.derived.get("scoring")
    if caches is None:
        caches = stack.derived["scoring"] = ModelCaches()
    return caches


def smallest_budget(vocabulary: int) -> int:
    """Bytes the vocabulary-sized products need at the least: one row of logits and one of bases, float32."""
    return 2 * 4 * vocabulary


def check_budget(memory_budget: int, vocabulary: int) -> None:
    """A one-line UserError when not even one row of the vocabulary-sized products fits the budget."""
    least = smallest_budget(vocabulary)
    if memory_budget < least:
        raise UserError(f"--max-memory {format_size(memory_budget)} is too small: one row of the vocabulary-sized "
                        f"products ({vocabulary} tokens) needs {format_size(least)}; give at least "
                        f"{format_size(least)}")
