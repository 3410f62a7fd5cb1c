"""A model's description for `info`: sizes, neuron counts and the weights' origin."""

from __future__ import annotations

from typing import Any

from .loaded import LoadedModel
from .forward import attention_path


def describe_model(model: LoadedModel) -> dict[str, Any]:
    s = model.shape
    return {
        "name": model.name,
        "family": s.family,
        "architecture": type(model.hf_model).__name__,
        "layers": s.n_layers,
        "heads": s.n_heads,
        "kv_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "hidden_size": s.d_model,
        "ffn_neurons_per_layer": s.d_ffn,
        "ffn_neurons": s.n_layers * s.d_ffn,
        "ffn_kind": s.ffn_kind,
        "norm": s.norm_kind,
        "block": _block(s),
        "vocab_size": s.vocab_size,
        "max_positions": s.max_positions,
        "attention_neurons_per_token": s.attention_neurons_per_token,
        "long_prompts": attention_path(model),
        "dtype": model.dtype,
        "device": str(model.device),
        "source": model.source,
    }


def _block(s) -> str:
    parts = ["parallel attention and FFN" if s.parallel else "sequential"]
    if s.post_norms:
        parts.append("post-sublayer norms")
    if s.logit_softcap is not None:
        parts.append(f"logits soft-capped at {s.logit_softcap:g}")
    return ", ".join(parts)
