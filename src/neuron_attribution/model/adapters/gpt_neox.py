"""GPT-NeoX (Pythia): LayerNorm, GELU MLP with biases, a fused `query_key_value` projection laid out per head
as [q, k, v] blocks of d_h rows, and — with `use_parallel_residual`, as in every Pythia — a parallel block:
h^l = h^{l-1} + A(ln1 h^{l-1}) + F(ln2 h^{l-1}) (docs/method.md §1)."""

from __future__ import annotations

from torch import Tensor

from .base import ModelPaths, ModelShape, optional_f32, rows_view, weight_of
from .linear import LinearAdapter


class GptNeoXAdapter(LinearAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    paths = ModelPaths(layers="gpt_neox.layers", attention="attention", value="attention.query_key_value",
                       attention_output="attention.dense", mlp="mlp", mlp_output="mlp.dense_4h_to_h",
                       final_norm="gpt_neox.final_layer_norm", attention_norm="input_layernorm",
                       ffn_norm="post_attention_layernorm")
    mlp_input = "mlp.dense_h_to_4h"

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        s = self.shape
        batch, tokens, _ = output.shape
        return output.reshape(batch, tokens, s.n_heads, 3, s.head_dim)[:, :, :, 2]

    def _value_rows(self, layer: int) -> tuple[Tensor, Tensor | None]:
        s, projection = self.shape, self.value_source(layer)
        rows = rows_view(weight_of(projection).reshape(s.n_heads, 3, s.head_dim, s.d_model), (slice(None), 2))
        bias = optional_f32(projection.bias)
        # (H, d_h, d) as it lies in the fused weight: a view, which the caller's reshape keeps one
        return rows, None if bias is None else bias.reshape(s.n_heads, 3, s.head_dim)[:, 2].reshape(-1)

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="gelu", norm_kind="layernorm",
                                               parallel=bool(self.config.use_parallel_residual))
