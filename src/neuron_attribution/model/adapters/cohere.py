"""Cohere (Command R) and Cohere 2: a parallel block — attention and the SwiGLU MLP both read `input_layernorm`'s
output — with LayerNorms without bias, and logits multiplied by `logit_scale`, which is folded here into the
final norm's gain (logits = U(s·γ ⊙ norm(h)), the same numbers)."""

from __future__ import annotations

from dataclasses import replace

from .base import ModelShape
from .llama import LLAMA_PATHS, LlamaAdapter


class CohereAdapter(LlamaAdapter):
    family = "cohere"
    model_types = ("cohere", "cohere2")
    paths = replace(LLAMA_PATHS, ffn_norm="input_layernorm")

    @property
    def logit_multiplier(self) -> float:
        return float(self.config.logit_scale)

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="swiglu", norm_kind="layernorm", parallel=True)
