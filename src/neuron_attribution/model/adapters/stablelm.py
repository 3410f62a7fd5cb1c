"""StableLM (2): LayerNorms, a SwiGLU MLP, grouped-query attention with partial rotary embeddings; with
`use_parallel_residual` a parallel block in which attention and MLP both read `input_layernorm`'s output."""

from __future__ import annotations

from .base import ModelShape, NormParams
from .llama import LlamaAdapter


class StableLmAdapter(LlamaAdapter):
    family = "stablelm"
    model_types = ("stablelm",)

    def ffn_norm(self, layer: int) -> NormParams:
        return self.attention_norm(layer) if self.shape.parallel else super().ffn_norm(layer)

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="swiglu", norm_kind="layernorm",
                                               parallel=bool(self.config.use_parallel_residual))
