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
        "block": _block(model),
        "vocab_size": s.vocab_size,
        "max_positions": s.max_positions,
        "attention_neurons_per_token": s.attention_neurons_per_token,
        "long_prompts": attention_path(model),
        "dtype": model.dtype,
        "device": str(model.device),
        "source": model.source,
    }


def _block(model: LoadedModel) -> str:
    """The block's declared shape in words (docs/method.md §1): what the adapter read off the family."""
    s, adapter = model.shape, model.adapter
    parts = ["parallel attention and FFN" if s.parallel else "sequential"]
    if s.n_experts:
        shared = f" and a shared expert of {s.shared_ffn}" if s.shared_ffn else ""
        parts.append(f"mixture-of-experts FFN: {s.n_experts} experts of {s.expert_ffn} neurons, "
                     f"{s.experts_per_token} active per token{shared}")
    if adapter.paths.attention_norm is None:
        parts.append("no norms before the sublayers")
    if s.post_norms:
        parts.append("post-sublayer norms")
    if adapter.norm_gain_offset:
        parts.append(f"norm gains {adapter.norm_gain_offset:g} + γ")
    if adapter.sublayers_add_residual:
        parts.append("sublayer modules add the residual themselves")
    if adapter.residual_multiplier != 1.0:
        parts.append(f"sublayer outputs × {adapter.residual_multiplier:g}")
    if adapter.logit_multiplier != 1.0:
        parts.append(f"logits × {adapter.logit_multiplier:g}")
    if s.logit_softcap is not None:
        parts.append(f"logits soft-capped at {s.logit_softcap:g}")
    return ", ".join(parts)
