"""Llama and the families built the same way (Mistral, Qwen2, Qwen3, SmolLM3): RMSNorm, SwiGLU MLP, grouped-query
attention. SmolLM3 leaves rotary embeddings out of some layers, which changes attention weights only.

Qwen2 adds biases to q/k/v; the value bias is part of the value state and is read here. Qwen3 normalises queries
and keys per head, which changes the attention weights (read from the model) but neither values nor outputs.
Families that differ only in their norms or fused projections (Gemma, OLMo 2, Phi-3) subclass this adapter with
other paths, overriding at most the reading of the fused weights.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import ModelPaths, ModelShape, weight_of
from .linear import LinearAdapter

LLAMA_PATHS = ModelPaths(layers="model.layers", attention="self_attn", value="self_attn.v_proj",
                         attention_output="self_attn.o_proj", mlp="mlp", mlp_output="mlp.down_proj",
                         final_norm="model.norm", attention_norm="input_layernorm",
                         ffn_norm="post_attention_layernorm")


class LlamaAdapter(LinearAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    paths = LLAMA_PATHS

    # Gate and up rows stacked in one `gate_up_proj`, gate rows first (Phi-3, GLM-4), or separate projections.
    fused_gate_up: ClassVar[bool] = False

    def _ffn_subkeys(self, layer: int) -> dict[str, Tensor]:
        mlp = self.mlp(layer)
        if self.fused_gate_up:
            gate, up = weight_of(mlp.gate_up_proj).chunk(2, dim=0)
            return {"gate": gate, "up": up}
        return {"gate": weight_of(mlp.gate_proj), "up": weight_of(mlp.up_proj)}

    def ffn_activation(self, layer: int):
        mlp = self.mlp(layer)
        return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="swiglu", norm_kind="rmsnorm")
