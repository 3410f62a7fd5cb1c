"""The few private transformers APIs this project reads, in one place, each behind a function that says what it
needs: which attention implementation a model runs, whether it can switch, switching it, registering one, a
family's eager attention, and a mixture's expert gate. A change in transformers breaks this module, not the
callers; a switch that fails is said, never silent."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class AttentionSwitchFailed(RuntimeError):
    """transformers refused to switch a model's attention implementation."""


def attention_implementation_of(hf_model: nn.Module) -> str | None:
    """The attention implementation the model runs ("eager", "sdpa", ...), as its config records it."""
    return getattr(hf_model.config, "_attn_implementation", None)


def can_switch_attention(hf_model: nn.Module) -> bool:
    """Whether the model supports SDPA and lets its attention implementation be switched at run time. A model
    class that cannot answer (an unusual one) is taken as unable, with a warning: it then runs eagerly (every
    family supports that), which costs memory quadratic in the prompt's length."""
    if not getattr(hf_model, "_supports_sdpa", False):
        return False
    try:
        return bool(hf_model._can_set_attn_implementation())
    except Exception as error:  # noqa: BLE001 - any failure means: do not switch
        warnings.warn(f"{type(hf_model).__name__} cannot say whether its attention can be switched ({error}); "
                      "running eager attention (memory quadratic in the prompt's length)", stacklevel=2)
        return False


def set_attention_implementation(hf_model: nn.Module, name: str) -> None:
    """Switch the model to `name`. Families that read the choice from their config at every call and cannot be
    switched the usual way (Falcon) get it written there."""
    try:
        hf_model.set_attn_implementation(name)
    except Exception as error:  # noqa: BLE001 - re-raised with what was asked
        raise AttentionSwitchFailed(f"transformers would not switch {type(hf_model).__name__} to {name} attention: "
                                    f"{error}") from error
    if attention_implementation_of(hf_model) != name:
        hf_model.config._attn_implementation = name


def register_attention(name: str, function: Callable, masks_like: str = "sdpa") -> None:
    """Make `name` an attention implementation models can be switched to (transformers' public
    `AttentionInterface`), given the masks `masks_like` gets; registering the same name again replaces it."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[masks_like])


def registered_attention(name: str) -> Callable:
    """The attention function registered under `name` ("sdpa", "eager" has none: it is each family's own)."""
    return ALL_ATTENTION_FUNCTIONS[name]


def family_eager_attention(module: nn.Module) -> Callable | None:
    """The eager attention function of an attention module's family (what it runs under "eager"), or None where
    its modelling file has none by the usual name."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def expert_gate(module: nn.Module, projected: Tensor) -> Tensor:
    """A gated experts module's own act(gate)·up from its fused input projection (its layout, its activation)."""
    return module._apply_gate(projected)
