"""Llama and the families built the same way (Mistral, Qwen2, Qwen3): RMSNorm, SwiGLU MLP, grouped-query attention.

Qwen2 adds biases to q/k/v; the value bias is part of the value state and is read here. Qwen3 normalises queries
and keys per head, which changes the attention weights (read from the model) but neither values nor outputs.
Families that differ only in their norms or fused projections (Gemma, OLMo 2, Phi-3) subclass this adapter with
other paths, overriding at most the reading of the fused weights.
"""

from __future__ import annotations

from torch import Tensor

from .base import ModelPaths, ModelShape, native
from .linear import LinearAdapter

LLAMA_PATHS = ModelPaths(layers="model.layers", attention="self_attn", value="self_attn.v_proj",
                         attention_output="self_attn.o_proj", mlp="mlp", mlp_output="mlp.down_proj",
                         final_norm="model.norm", attention_norm="input_layernorm",
                         ffn_norm="post_attention_layernorm")


class LlamaAdapter(LinearAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    paths = LLAMA_PATHS

    def _ffn_subkeys(self, layer: int) -> dict[str, Tensor]:
        mlp = self.mlp(layer)
        return {"gate": native(mlp.gate_proj.weight), "up": native(mlp.up_proj.weight)}

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_standard_config(ffn_kind="swiglu", norm_kind="rmsnorm")
