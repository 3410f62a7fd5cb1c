"""What the method needs to know about a model family, named once.

An adapter is data about a Hugging Face model: which modules to hook and which weights play which role in
docs/method.md §1. It never re-implements a forward pass. All weights it hands out are float32 copies, so every
computation downstream is float32 whatever dtype the model runs in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...neurons import ModelShape, NormKind

@dataclass(frozen=True)
class NormParams:
    """A LayerNorm or RMSNorm, as parameters. The only place that branches on the kind of norm."""

    kind: NormKind
    weight: Tensor  # (d,): the effective gain γ
    bias: Tensor | None  # (d,), LayerNorm only
    eps: float

    def linear_part(self, vectors: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """γ ⊙ centre(u) · scale for each row u: the norm with its scale frozen at `scale`, bias left out.
        Linear in u (LayerNorm's centring subtracts each row's own mean)."""
        if self.kind == "layernorm":
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors * (self.weight * scale)

    def own_scale(self, vectors: Tensor) -> Tensor:
        """1/rms (RMSNorm) or 1/std (LayerNorm) of each row: the scale the norm applies to it."""
        if self.kind == "layernorm":
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return torch.rsqrt(vectors.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def apply_without_bias(self, vectors: Tensor) -> Tensor:
        """The norm as the model applies it to each row, with the row's own scale, bias left out."""
        return self.linear_part(vectors, self.own_scale(vectors))

    def adjoint(self, covectors: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """The adjoint of `linear_part`: k with k·u = r·linear_part(u) for every u, for each row r."""
        k = covectors * (self.weight * scale)
        if self.kind == "layernorm":
            k = k - k.mean(dim=-1, keepdim=True)
        return k


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, float32, in the orientation the method uses."""

    attention_norm: NormParams
    ffn_norm: NormParams
    value_weight: Tensor  # (H_kv, d_h, d): value state of KV head g = value_weight[g] @ x̂ + value_bias[g]
    value_bias: Tensor | None  # (H_kv, d_h)
    output_weight: Tensor  # (H, d_h, d): attention neuron (j, n) writes output_weight[j, n] (may be a view)
    output_bias: Tensor | None  # (d,)
    ffn_subkeys: dict[str, Tensor]  # name -> (N, d); "key" for GELU MLPs, "gate" and "up" for SwiGLU
    ffn_values: Tensor  # (N, d): FFN neuron k writes coefficient · ffn_values[k] (may be a strided view)
    ffn_bias: Tensor | None  # (d,)


def as_f32(t: Tensor) -> Tensor:
    """A float32 CPU tensor with t's values. A float32 CPU weight is shared, not copied (scoring only reads
    weights; after changing the model's weights in place, call `forget_weights`)."""
    return t.detach().to(device="cpu", dtype=torch.float32)


# config.model_type -> the adapter that covers it; filled by FamilyAdapter subclasses as they are defined.
ADAPTERS: dict[str, type[FamilyAdapter]] = {}


class FamilyAdapter(ABC):
    """Names the parts of one model family. Subclasses live one per file in this package."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter covers

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in getattr(cls, "model_types", ()):
            if model_type in ADAPTERS and ADAPTERS[model_type] is not cls:
                raise TypeError(f"two adapters claim model_type {model_type!r}")
            ADAPTERS[model_type] = cls

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model
        self.config = hf_model.config
        self._layer_cache: dict[int, LayerWeights] = {}

    # --- hook points --------------------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]:
        """Modules whose input is the residual stream h^{l-1}."""

    @abstractmethod
    def attention(self, layer: int) -> nn.Module:
        """Module whose output is (A^l, attention weights) under eager attention."""

    @abstractmethod
    def value_source(self, layer: int) -> nn.Module:
        """Module whose output contains the value states of this layer."""

    @abstractmethod
    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        """(B, T, H_kv, d_h) value states from `value_source`'s output (bias included)."""

    @abstractmethod
    def attention_output_projection(self, layer: int) -> nn.Module:
        """Module whose input is the heads' concatenated outputs (H·d_h per position), before W_O."""

    @abstractmethod
    def mlp(self, layer: int) -> nn.Module:
        """Module whose output is F^l."""

    @abstractmethod
    def mlp_output_projection(self, layer: int) -> nn.Module:
        """Module whose input is the FFN coefficients m (N per position)."""

    @abstractmethod
    def final_norm_module(self) -> nn.Module:
        """Module whose input is the final residual h^L."""

    # --- weights ------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def shape(self) -> ModelShape: ...

    @abstractmethod
    def _read_layer_weights(self, layer: int) -> LayerWeights: ...

    @abstractmethod
    def final_norm(self) -> NormParams: ...

    @abstractmethod
    def _read_unembedding(self) -> tuple[Tensor, Tensor | None]:
        """(V, d) output matrix and optional (V,) bias."""

    def layer_weights(self, layer: int) -> LayerWeights:
        if layer not in self._layer_cache:
            self._layer_cache[layer] = self._read_layer_weights(layer)
        return self._layer_cache[layer]

    @cached_property
    def unembedding(self) -> tuple[Tensor, Tensor | None]:
        weight, bias = self._read_unembedding()
        return weight.contiguous(), bias

    @cached_property
    def max_unembedding_norm(self) -> float:
        """max_v ‖U_v‖ over the vocabulary (a weight property, computed once)."""
        return float(self.unembedding[0].norm(dim=-1).max())

    @cached_property
    def all_ffn_values(self) -> Tensor:
        """(L, N, d): every layer's FFN value vectors, stacked once for vectorised scoring."""
        return torch.stack([self.layer_weights(l).ffn_values for l in range(self.shape.n_layers)])

    @cached_property
    def all_output_weights(self) -> Tensor:
        """(L, H, d_h, d): every layer's attention output vectors."""
        return torch.stack([self.layer_weights(l).output_weight for l in range(self.shape.n_layers)])

    def forget_weights(self) -> None:
        """Drop the float32 copies (call after the model's weights were changed)."""
        self._layer_cache.clear()
        for name in ("unembedding", "max_unembedding_norm", "all_ffn_values", "all_output_weights"):
            self.__dict__.pop(name, None)


def norm_from_module(module: nn.Module, kind: NormKind) -> NormParams:
    if kind == "layernorm":
        bias = None if module.bias is None else as_f32(module.bias)
        return NormParams("layernorm", as_f32(module.weight), bias, float(module.eps))
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps")
    return NormParams("rmsnorm", as_f32(module.weight), None, float(eps))
