"""StarCoder2: Llama's attention (grouped-query, with biases) and LayerNorms, and a GELU MLP `c_fc` → `c_proj`
with biases."""

from __future__ import annotations

from dataclasses import replace

from .base import ModelShape
from .linear import LinearAdapter
from .llama import LLAMA_PATHS


class Starcoder2Adapter(LinearAdapter):
    family = "starcoder2"
    model_types = ("starcoder2",)
    paths = replace(LLAMA_PATHS, mlp_output="mlp.c_proj")
    mlp_input = "mlp.c_fc"

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="gelu", norm_kind="layernorm")
