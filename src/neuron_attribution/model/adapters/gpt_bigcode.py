"""GPT-BigCode (SantaCoder, StarCoder 1): GPT-2's block with nn.Linear projections and a fused `c_attn`. With
`multi_query` (every released checkpoint) it holds the queries of all heads, then one key and one value head
(d + 2·d_h outputs) shared by every query head; without, [q, k, v] blocks of d_h per head."""

from __future__ import annotations

from torch import Tensor

from .base import ModelPaths, ModelShape, optional_f32, rows_view, weight_of
from .linear import LinearAdapter


class GptBigCodeAdapter(LinearAdapter):
    family = "gpt_bigcode"
    model_types = ("gpt_bigcode",)
    paths = ModelPaths(layers="transformer.h", attention="attn", value="attn.c_attn", attention_output="attn.c_proj",
                       mlp="mlp", mlp_output="mlp.c_proj", final_norm="transformer.ln_f", attention_norm="ln_1",
                       ffn_norm="ln_2")
    mlp_input = "mlp.c_fc"

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        s = self.shape
        batch, tokens, _ = output.shape
        if self.config.multi_query:
            return output[..., s.d_model + s.head_dim:].reshape(batch, tokens, 1, s.head_dim)
        return output.reshape(batch, tokens, s.n_heads, 3, s.head_dim)[:, :, :, 2]

    def _value_rows(self, layer: int) -> tuple[Tensor, Tensor | None]:
        s, projection = self.shape, self.value_source(layer)
        rows, bias = weight_of(projection), optional_f32(projection.bias)
        if self.config.multi_query:
            start = s.d_model + s.head_dim
            return rows_view(rows, slice(start, None)), None if bias is None else bias[start:]
        rows = rows_view(rows.reshape(s.n_heads, 3, s.head_dim, s.d_model), (slice(None), 2))
        return rows, None if bias is None else bias.reshape(s.n_heads, 3, s.head_dim)[:, 2].reshape(-1)

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config("gelu", "layernorm", layers="n_layer", heads="n_head",
                                      hidden="n_embd", ffn="n_inner", positions="n_positions",
                                      kv_heads=1 if self.config.multi_query else None)
