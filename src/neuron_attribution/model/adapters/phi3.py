"""Phi-3: Llama's block with fused projections, sliced here: `qkv_proj` stacks the query rows, then the key
rows, then the value rows (H·d_h, H_kv·d_h, H_kv·d_h); `gate_up_proj` stacks the gate rows, then the up rows."""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from .llama import LLAMA_PATHS, LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)
    paths = replace(LLAMA_PATHS, value="self_attn.qkv_proj")
    fused_gate_up = True

    def _value_start(self) -> int:
        s = self.shape
        return (s.n_heads + s.n_kv_heads) * s.head_dim

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        return super().values_from_output(layer, output[..., self._value_start():])

    def _value_rows(self, layer: int) -> tuple[Tensor, Tensor | None]:
        rows, bias = super()._value_rows(layer)  # all of qkv_proj
        start = self._value_start()
        return rows[start:], None if bias is None else bias[start:]

