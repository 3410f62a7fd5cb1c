"""A model's description for `info`: sizes, neuron counts and the weights' origin."""

from __future__ import annotations

from typing import Any

from ..settings import format_size
from .loaded import LoadedModel
from .quantization import quantized_layers
from .quantization.compressed_tensors import is_compressed_tensors
from .quantization.methods import quantization_of
from .forward import attention_path


def describe_model(model: LoadedModel) -> dict[str, Any]:
    s, held = model.shape, model_bytes(model.hf_model)
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
        "quantization": quantization_in_words(model.hf_model),
        "memory": format_size(held),
        "memory_bytes": held,
        "device": str(model.device),
        "source": model.source,
    }


def model_bytes(hf_model) -> int:
    """The model's parameters and buffers as held (a quantized layer's packed codes and scales, not a float copy)."""
    tensors = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    total = sum(_held_bytes(t) for t in tensors.values())
    for module in hf_model.modules():  # bitsandbytes keeps a 4-bit layer's scales beside its parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
    return total


def _held_bytes(tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) holds its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__module__.startswith("torchao."):
        names, _ = flatten()
        return sum(_held_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _state_tensors(state) -> list:
    tensors = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, getattr(nested, "code", None)]
    return [t for t in tensors if t is not None and hasattr(t, "numel")]


def quantization_in_words(hf_model) -> str:
    """"none", or the method and how many linear layers it holds ("bnb-4bit (nf4, double quantisation): 210
    linear layers")."""
    if is_compressed_tensors(hf_model):
        stored = hf_model.config.quantization_config  # transformers' config, the package's own inside it
        inner = stored.get("format") if isinstance(stored, dict) else getattr(stored, "quantization_config", None)
        form = inner if isinstance(inner, str) or inner is None else getattr(inner, "format", None)
        return f"compressed-tensors ({form or 'unknown format'}), run decompressed as transformers runs it"
    layers = quantized_layers(hf_model)
    if not layers:
        return quantization_of(hf_model) or "none"
    methods = sorted({reader.method for reader in layers.values()})
    return f"{', '.join(methods)}: {len(layers)} linear layers"


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
