"""Per-family adapters. Adding a family is one file here plus one line in `ADAPTERS`."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .base import FamilyAdapter, LayerWeights, ModelShape, NormParams
from .gpt2 import Gpt2Adapter
from .llama import LlamaAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (Gpt2Adapter, LlamaAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_for(hf_model: nn.Module) -> FamilyAdapter:
    model_type = getattr(hf_model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(hf_model)
    raise UserError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "FamilyAdapter", "LayerWeights", "ModelShape", "NormParams", "adapter_for",
           "supported_model_types"]
