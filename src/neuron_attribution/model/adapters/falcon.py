"""Falcon: a parallel block (`parallel_attn`, every released checkpoint) in which attention and the GELU MLP read
one LayerNorm's output (`input_layernorm`; Falcon-40B/180B's new decoder architecture has `ln_attn` and `ln_mlp`),
and a fused `query_key_value`: multi-query [all queries, one key, one value head] (7B), grouped by KV head
[queries of the group, key, value] (new architecture), or [q, k, v] per head. Sequential blocks and ALiBi
models (Falcon-RW) are refused."""

from __future__ import annotations

from torch import Tensor

from ...errors import UserError
from .base import ModelPaths, ModelShape, NormParams, optional_f32, rows_view, weight_of
from .linear import LinearAdapter


class FalconAdapter(LinearAdapter):
    family = "falcon"
    model_types = ("falcon",)
    paths = ModelPaths(layers="transformer.h", attention="self_attention", value="self_attention.query_key_value",
                       attention_output="self_attention.dense", mlp="mlp", mlp_output="mlp.dense_4h_to_h",
                       final_norm="transformer.ln_f", attention_norm="input_layernorm", ffn_norm="input_layernorm")
    mlp_input = "mlp.dense_h_to_4h"

    def _two_norms(self) -> bool:
        c = self.config
        return bool(c.new_decoder_architecture) and getattr(c, "num_ln_in_parallel_attn", 2) == 2

    def attention_norm(self, layer: int) -> NormParams:
        return self._norm_at(layer, "ln_attn" if self._two_norms() else "input_layernorm")

    def ffn_norm(self, layer: int) -> NormParams:
        return self._norm_at(layer, "ln_mlp" if self._two_norms() else "input_layernorm")

    def _layout(self) -> tuple[int, int]:
        """(groups, rows per group in units of d_h); the value is each group's last d_h rows."""
        s, c = self.shape, self.config
        if c.new_decoder_architecture:
            return s.n_kv_heads, s.n_heads // s.n_kv_heads + 2
        if c.multi_query:
            return 1, s.n_heads + 2
        return s.n_heads, 3

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        s = self.shape
        groups, per_group = self._layout()
        batch, tokens, _ = output.shape
        return output.reshape(batch, tokens, groups, per_group, s.head_dim)[:, :, :, -1]

    def _value_rows(self, layer: int) -> tuple[Tensor, Tensor | None]:
        s, projection = self.shape, self.value_source(layer)
        groups, per_group = self._layout()
        rows = rows_view(weight_of(projection).reshape(groups, per_group, s.head_dim, s.d_model), (slice(None), -1))
        bias = optional_f32(projection.bias)
        return rows, None if bias is None else bias.reshape(groups, per_group, s.head_dim)[:, -1].reshape(-1)

    @property
    def shape(self) -> ModelShape:
        c = self.config
        if not c.parallel_attn or c.alibi:
            raise UserError("this Falcon model has a sequential block or ALiBi (Falcon-RW); only the parallel, "
                            "rotary Falcon block is supported")
        kv = c.num_kv_heads if c.new_decoder_architecture else (1 if c.multi_query else c.num_attention_heads)
        return self.shape_from_config("gelu", "layernorm", True, ffn="ffn_hidden_size", kv_heads=kv)
