"""Phi (Phi-1/1.5/2): a parallel block with one shared LayerNorm, like GPT-J; q/k/v projections with biases
(optional q/k LayerNorms change only the attention weights), GELU MLP with biases, an output head with a bias."""

from __future__ import annotations

from .base import ModelPaths, ModelShape
from .linear import LinearAdapter


class PhiAdapter(LinearAdapter):
    family = "phi"
    model_types = ("phi",)
    paths = ModelPaths(layers="model.layers", attention="self_attn", value="self_attn.v_proj",
                       attention_output="self_attn.dense", mlp="mlp", mlp_output="mlp.fc2",
                       final_norm="model.final_layernorm", attention_norm="input_layernorm",
                       ffn_norm="input_layernorm")
    mlp_input = "mlp.fc1"

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="gelu", norm_kind="layernorm", parallel=True)
