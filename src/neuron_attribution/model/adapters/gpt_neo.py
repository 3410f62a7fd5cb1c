"""GPT-Neo: GPT-2's block (LayerNorm, GELU MLP with biases) with nn.Linear projections, separate q/k/v without
biases inside `attn.attention`, and local attention in alternate layers (which changes attention weights only)."""

from __future__ import annotations

from .base import ModelPaths, ModelShape
from .linear import LinearAdapter


class GptNeoAdapter(LinearAdapter):
    family = "gpt_neo"
    model_types = ("gpt_neo",)
    paths = ModelPaths(layers="transformer.h", attention="attn.attention", value="attn.attention.v_proj",
                       attention_output="attn.attention.out_proj", mlp="mlp", mlp_output="mlp.c_proj",
                       final_norm="transformer.ln_f", attention_norm="ln_1", ffn_norm="ln_2")
    mlp_input = "mlp.c_fc"

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config("gelu", "layernorm", layers="num_layers", heads="num_heads")
