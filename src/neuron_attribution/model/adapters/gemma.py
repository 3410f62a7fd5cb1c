"""Gemma (1): Llama's block with RMSNorms that multiply by 1 + weight, a GeGLU MLP (gate and up rows, read like
SwiGLU's) and an embedding scaled by √d inside the model (so h^0, as the trace reads it, already carries it)."""

from __future__ import annotations

from .llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma",)
    norm_gain_offset = 1.0
