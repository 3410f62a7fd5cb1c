"""GPT-J: a parallel block with one shared LayerNorm, h^l = h^{l-1} + A(ln h^{l-1}) + F(ln h^{l-1}); separate
q/k/v projections without biases, GELU MLP with biases, an output head with a bias."""

from __future__ import annotations

from .base import ModelPaths, ModelShape
from .linear import LinearAdapter


class GptJAdapter(LinearAdapter):
    family = "gptj"
    model_types = ("gptj",)
    paths = ModelPaths(layers="transformer.h", attention="attn", value="attn.v_proj", attention_output="attn.out_proj",
                       mlp="mlp", mlp_output="mlp.fc_out", final_norm="transformer.ln_f", attention_norm="ln_1",
                       ffn_norm="ln_1")
    mlp_input = "mlp.fc_in"

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config("gelu", "layernorm", True, layers="n_layer", heads="n_head",
                                      hidden="n_embd", ffn="n_inner", positions="n_positions")
