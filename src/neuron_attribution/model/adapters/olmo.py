"""OLMo (1): Llama's block with LayerNorms that have no parameters (no gain, no bias, ε = 1e-5). `clip_qkv`
clamps the value states, which the value rows cannot express: such configs are refused."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError
from .base import ModelShape, NormParams
from .llama import LlamaAdapter

PARAMETERLESS_EPS = 1e-5  # OlmoLayerNorm's fixed ε


class OlmoAdapter(LlamaAdapter):
    family = "olmo"
    model_types = ("olmo",)

    def _norm(self, module: nn.Module) -> NormParams:
        return NormParams("layernorm", torch.ones(self.shape.d_model, device=self.device), None, PARAMETERLESS_EPS)

    @staticmethod
    def refuse_clipped_values(config) -> None:
        if getattr(config, "clip_qkv", None) is not None:
            raise UserError(f"an {config.model_type} model with clip_qkv clamps its value states; its attention "
                            "neurons are not linear in them, so it is not supported")

    @property
    def shape(self) -> ModelShape:
        self.refuse_clipped_values(self.config)
        return self.shape_from_config(ffn_kind="swiglu", norm_kind="layernorm")
