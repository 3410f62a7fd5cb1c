"""Reused vocabulary-sized buffers for exact scoring."""

from __future__ import annotations

import threading

import torch
from torch import Tensor


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
