"""Gemma 3 (text): Gemma 2's sandwich norms and 1 + weight gains, with per-head query/key norms (they change the
attention weights, which are read from the model, not the values) and no final soft-capping by default."""

from __future__ import annotations

from .gemma2 import Gemma2Adapter


class Gemma3Adapter(Gemma2Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
