"""Reused vocabulary-sized buffers for exact scoring."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from ..errors import UserError
from ..settings import format_size


class Scratch:
    """Reused vocabulary-sized buffers. A fresh 100 MB tensor per batch costs more in page faults than the
    exp() over it; these are allocated once per thread and grown when a larger batch needs it."""

    def __init__(self):
        self._local = threading.local()

    def buffer(self, name: str, rows: int, columns: int, device: torch.device) -> Tensor:
        store = self._local.__dict__.setdefault("buffers", {})
        key = (name, device)
        held = store.get(key)
        if held is None or held.shape[1] != columns or held.shape[0] < rows:
            held = store[key] = torch.empty(rows, columns, device=device)
        return held[:rows]


scratch = Scratch()


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
