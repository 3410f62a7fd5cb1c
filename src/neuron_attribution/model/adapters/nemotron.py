"""Nemotron: LayerNorms that multiply by 1 + weight (`LayerNorm1P`), an MLP without a gate whose activation is the
squared ReLU (`up_proj` → relu² → `down_proj`), grouped-query attention with partial rotary embeddings."""

from __future__ import annotations

from .base import ModelShape
from .linear import LinearAdapter
from .llama import LLAMA_PATHS


class NemotronAdapter(LinearAdapter):
    family = "nemotron"
    model_types = ("nemotron",)
    paths = LLAMA_PATHS
    mlp_input = "mlp.up_proj"
    norm_gain_offset = 1.0

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config(ffn_kind="relu2", norm_kind="layernorm")
