"""Per-family adapters, one file each. Every module in this package is imported here, and each
`FamilyAdapter` subclass registers the `config.model_type` values it covers: adding a family is one file."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ...errors import UserError
from ...neurons import ModelShape
from .base import ADAPTERS, FamilyAdapter, LayerWeights, ModelPaths, NormParams

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(hf_model: nn.Module) -> FamilyAdapter:
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(f"unsupported architecture {model_type!r} ({_what_it_lacks(hf_model.config)}); "
                        f"supported: {', '.join(supported_model_types())}")
    return ADAPTERS[model_type](hf_model)


def _what_it_lacks(config) -> str:
    """Why no adapter reads this block, as far as its config tells."""
    if getattr(config, "state_size", None) or getattr(config, "ssm_state_size", None):
        return "state-space layers, not attention: no attention neurons to read"
    if getattr(config, "kv_lora_rank", None):
        return "multi-head latent attention, which no adapter reads"
    if getattr(config, "swiglu_limit", None):  # gpt-oss
        return ("a mixture-of-experts FFN whose experts add router-weighted biases to a clamped "
                "(up + 1)·gate·σ(α·gate), which is not a sum of act(gate)·up neurons")
    if any(getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts")):
        return "a mixture-of-experts FFN of a kind no adapter declares"
    return "no adapter declares its block"


__all__ = ["ADAPTERS", "FamilyAdapter", "LayerWeights", "ModelPaths", "ModelShape", "NormParams", "adapter_for",
           "supported_model_types"]
