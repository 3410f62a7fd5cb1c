"""BLOOM: LayerNorms (and one on the embeddings, before the first layer), a fused `query_key_value` laid out per
head as [q, k, v] blocks of d_h rows like GPT-NeoX's, ALiBi position biases (read with the attention weights),
a GELU MLP with biases. Its attention and MLP modules add the residual themselves; the trace takes it off again.
`apply_residual_connection_post_layernorm` (a residual taken after the norm) is not this block: refused."""

from __future__ import annotations

from ...errors import UserError
from .base import ModelPaths, ModelShape
from .gpt_neox import GptNeoXAdapter


class BloomAdapter(GptNeoXAdapter):
    family = "bloom"
    model_types = ("bloom",)
    paths = ModelPaths(layers="transformer.h", attention="self_attention", value="self_attention.query_key_value",
                       attention_output="self_attention.dense", mlp="mlp", mlp_output="mlp.dense_4h_to_h",
                       final_norm="transformer.ln_f", attention_norm="input_layernorm",
                       ffn_norm="post_attention_layernorm")
    mlp_input = "mlp.dense_h_to_4h"
    sublayers_add_residual = True

    @property
    def shape(self) -> ModelShape:
        c = self.config
        if c.apply_residual_connection_post_layernorm or (c.pretraining_tp > 1 and c.slow_but_exact):
            raise UserError("this BLOOM model takes its residual after the norm, or splits its projections "
                            "(slow_but_exact); only the standard BLOOM block is supported")
        return self.shape_from_config("gelu", "layernorm", layers="n_layer", heads="n_head")
