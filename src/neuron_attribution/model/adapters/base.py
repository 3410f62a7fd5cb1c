"""What the method needs to know about a model family, named once.

An adapter is data about a Hugging Face model: which modules to hook and which weights play which role in
docs/method.md §1. It never re-implements a forward pass. Weight matrices are handed out as the model holds them
(its dtype, the layer's device: views, never copies); scoring reads them as float32 a chunk at a time
(`model/weights.py`). Norm gains and biases, vectors of the hidden size, are float32 on the scoring device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from functools import cached_property
from operator import attrgetter
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...neurons import FfnKind, ModelShape, NormKind
from ...registry import Registry
from ..quantization import DequantisedMatrix, weight_of
from ..weights import LayerStack, Matrix, RowParts
from .norms import NormParams, as_f32, identity_norm, norm_from_module


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights in the orientation the method uses: matrices as views of the model's own
    parameters (its dtype, on the layer's device; read rows with `.float()`), norms and biases float32 on the
    scoring device."""

    attention_norm: NormParams
    ffn_norm: NormParams
    value_weight: Tensor  # (H_kv, d_h, d): value state of KV head g = value_weight[g] @ x̂ + value_bias[g]
    value_bias: Tensor | None  # (H_kv, d_h)
    output_weight: Tensor  # (H, d_h, d): attention neuron (j, n) writes output_weight[j, n] (may be a view)
    output_bias: Tensor | None  # (d,)
    ffn_subkeys: dict[str, Tensor | RowParts]  # name -> (N, d); "key" for GELU MLPs, "gate" and "up" for SwiGLU
    ffn_values: Tensor | RowParts  # (N, d): neuron k writes coefficient · ffn_values[k] (a view, or experts' views)
    ffn_bias: Tensor | None  # (d,)
    # Norms applied to a sublayer's output before it is added to the residual (Gemma 2/3, OLMo 2), else None.
    attention_post_norm: NormParams | None = None
    ffn_post_norm: NormParams | None = None


@dataclass(frozen=True)
class ModelPaths:
    """Where a family keeps the parts the method reads, as attribute paths: `layers`, `final_norm` and
    `unembedding` from the model, the others from one decoder layer. The norms declare the block's topology:
    a missing input norm is None (the sublayer reads the raw residual, as in OLMo 2); post-norms, applied to a
    sublayer's output before it is added (Gemma 2/3, OLMo 2), are None where the block has none."""

    layers: str
    attention: str  # output: (A^l, attention weights)
    value: str  # output holds the value states
    attention_output: str  # W_O: input is the heads' concatenated outputs
    mlp: str  # output: F^l
    # The FFN's output projection: its input is the coefficients m. In a mixture of experts, the shared expert's
    # (None without one: the routed experts are read through their own module, `FamilyAdapter.experts`).
    mlp_output: str | None
    final_norm: str
    attention_norm: str | None
    ffn_norm: str | None  # the same path as attention_norm where one norm feeds both (GPT-J, Phi-2)
    attention_post_norm: str | None = None
    ffn_post_norm: str | None = None
    unembedding: str = "lm_head"


def native(t: Tensor) -> Tensor:
    """A weight matrix as the model holds it (dtype and device), detached: a view, never a copy."""
    return t.detach()


def rows_view(weight: Tensor | DequantisedMatrix, index) -> Tensor | DequantisedMatrix:
    """The rows `index` selects of a weight as the adapter reads it: a view of a tensor, or another view of a
    quantized layer's matrix (nothing read yet)."""
    return weight.view_of(index) if isinstance(weight, DequantisedMatrix) else weight[index]


def optional_f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else as_f32(t)


def moved(value, device: torch.device):
    """Tensors, NormParams, LayerWeights, dicts and tuples of them, on `device` (shared where already there)."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(moved(item, device) for item in value)
    return replace(value, **{f.name: moved(getattr(value, f.name), device) for f in fields(value)})


# config.model_type -> the adapter that covers it; filled by FamilyAdapter subclasses as they are defined.
ADAPTERS: Registry[type[FamilyAdapter]] = Registry("adapters")


class FamilyAdapter(ABC):
    """Names the parts of one model family. Subclasses live one per file in this package."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter covers
    paths: ClassVar[ModelPaths]
    norm_gain_offset: ClassVar[float] = 0.0  # Gemma's RMSNorm multiplies by 1 + weight
    # The attention and MLP modules add the residual they are given (their second argument) to what they return
    # (Bloom): the sublayer's own output is the module's output less that residual.
    sublayers_add_residual: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in getattr(cls, "model_types", ()):
            ADAPTERS.register(model_type, cls)

    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model
        self.config = hf_model.config
        self._layer_cache: dict[int, LayerWeights] = {}

    # --- hook points, found through `paths` -----------------------------------------------------------------
    def decoder_layers(self) -> list[nn.Module]:
        """Modules whose input is the residual stream h^{l-1}."""
        return list(attrgetter(self.paths.layers)(self.hf_model))

    def _layer(self, layer: int) -> nn.Module:
        return attrgetter(self.paths.layers)(self.hf_model)[layer]

    def _in_layer(self, layer: int, path: str) -> nn.Module:
        return attrgetter(path)(self._layer(layer))

    def attention(self, layer: int) -> nn.Module:
        """Module whose output is (A^l, attention weights) under eager attention."""
        return self._in_layer(layer, self.paths.attention)

    def value_source(self, layer: int) -> nn.Module:
        """Module whose output contains the value states of this layer."""
        return self._in_layer(layer, self.paths.value)

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        """(B, T, H_kv, d_h) value states from `value_source`'s output (bias included)."""
        batch, tokens, _ = output.shape
        return output.reshape(batch, tokens, self.shape.n_kv_heads, self.shape.head_dim)

    def attention_output_projection(self, layer: int) -> nn.Module:
        """Module whose input is the heads' concatenated outputs (H·d_h per position), before W_O."""
        return self._in_layer(layer, self.paths.attention_output)

    def mlp(self, layer: int) -> nn.Module:
        """Module whose output is F^l."""
        return self._in_layer(layer, self.paths.mlp)

    def mlp_output_projection(self, layer: int) -> nn.Module | None:
        """Module whose input is the FFN coefficients m (N per position); in a mixture of experts, the shared
        expert's (its coefficients follow the routed experts' rows), None without one."""
        path = self.paths.mlp_output
        return None if path is None else self._in_layer(layer, path)

    def experts(self, layer: int) -> nn.Module | None:
        """A mixture-of-experts layer's routed experts (`model/experts.py`); None for a dense FFN."""
        return None

    def shared_expert_gate(self, layer: int) -> nn.Module | None:
        """A module whose output's sigmoid scales the shared expert's output (Qwen2-MoE), if any."""
        return None

    def final_norm_module(self) -> nn.Module:
        """Module whose input is the final residual h^L."""
        return attrgetter(self.paths.final_norm)(self.hf_model)

    # --- weights ------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def shape(self) -> ModelShape: ...

    @abstractmethod
    def _read_layer_weights(self, layer: int) -> LayerWeights: ...

    def shape_from_config(self, ffn_kind: FfnKind, norm_kind: NormKind, parallel: bool = False, *,
                          layers: str = "num_hidden_layers", heads: str = "num_attention_heads",
                          hidden: str = "hidden_size", ffn: str = "intermediate_size",
                          positions: str = "max_position_embeddings", kv_heads: int | None = None) -> ModelShape:
        """The shape from the config, under the names this family's config uses (defaults: the names most
        families share); the block's kinds are the family's to declare. An FFN width of None is 4·d (GPT-2's
        `n_inner`); grouped-query heads and head_dim are read where the config has them."""
        c = self.config
        n_heads, d_model = getattr(c, heads), getattr(c, hidden)
        return ModelShape(
            family=c.model_type,
            n_layers=getattr(c, layers),
            n_heads=n_heads,
            n_kv_heads=kv_heads or getattr(c, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(c, "head_dim", None) or d_model // n_heads,
            d_model=d_model,
            d_ffn=getattr(c, ffn, None) or 4 * d_model,
            vocab_size=c.vocab_size,
            max_positions=getattr(c, positions, None),
            ffn_kind=ffn_kind,
            norm_kind=norm_kind,
            parallel=parallel,
            post_norms=self.paths.attention_post_norm is not None,
            logit_softcap=getattr(c, "final_logit_softcapping", None),
        )

    def _norm(self, module: nn.Module) -> NormParams:
        return norm_from_module(module, self.shape.norm_kind, self.norm_gain_offset)

    @property
    def logit_multiplier(self) -> float:
        """What the logits are multiplied by after the unembedding (Cohere's `logit_scale`, Granite's
        1/`logits_scaling`); 1 for most families. Folded into the final norm's gain: the same logits."""
        return 1.0

    @property
    def residual_multiplier(self) -> float:
        """What each sublayer's output is multiplied by before it is added to the residual (Granite); 1 for most
        families. The trace records the outputs as added, and neurons' residual directions carry it."""
        return 1.0

    def final_norm(self) -> NormParams:
        norm = self._norm(self.final_norm_module())
        if self.logit_multiplier != 1.0:
            norm = replace(norm, weight=norm.weight * self.logit_multiplier,
                           bias=None if norm.bias is None else norm.bias * self.logit_multiplier)
        return moved(norm, self.device)

    def _read_unembedding(self) -> tuple[Tensor, Tensor | None]:
        """(V, d) output matrix (as the model holds it) and optional (V,) float32 bias."""
        head = attrgetter(self.paths.unembedding)(self.hf_model)
        return weight_of(head, self.paths.unembedding), optional_f32(head.bias)

    @property
    def device(self) -> torch.device:
        """Where scores are computed: the device of the output head (the last one, for a model spread over
        several). Weights, the trace and every vocabulary-sized product live there, in float32."""
        return self.hf_model.get_output_embeddings().weight.device

    def layer_weights(self, layer: int) -> LayerWeights:
        """Views of the layer's matrices where they live; its norms and biases on the scoring device (kept: they
        take no memory beyond a few hidden-size vectors)."""
        if layer not in self._layer_cache:
            weights = self._read_layer_weights(layer)
            self._layer_cache[layer] = replace(weights, **{name: moved(getattr(weights, name), self.device)
                                                           for name in _SMALL_PARTS})
        return self._layer_cache[layer]

    @property
    def unembedding(self) -> tuple[Tensor, Tensor | None]:
        """(V, d) as the model holds it, and the optional float32 (V,) bias on the scoring device."""
        weight, bias = self._read_unembedding()
        return weight, moved(bias, self.device)

    @cached_property
    def unembedding_matrix(self) -> Matrix:
        """The unembedding, read in place (float32) or a chunk of rows at a time (other dtypes)."""
        return Matrix.of(self.unembedding[0], self.device)

    @cached_property
    def max_unembedding_norm(self) -> float:
        """max_v ‖U_v‖ over the vocabulary (a weight property, computed once)."""
        return float(self.unembedding_matrix.norms().max())

    @cached_property
    def ffn_value_stack(self) -> LayerStack:
        """Every layer's FFN value vectors as directions in the residual stream, (L, N, d) as a `LayerStack` read
        where the weights live. Behind a post-norm, a vector reaches the residual multiplied by the norm's gain γ
        and its frozen scale; γ is folded in here, the per-position scale lives in the trace."""
        return LayerStack([Matrix.of(w.ffn_values, self.device, self._residual_gain(w.ffn_post_norm))
                           for w in self._all_layer_weights()], self.device)

    @cached_property
    def output_weight_stack(self) -> LayerStack:
        """Every layer's attention output vectors, (L, H·d_h, d) (row head·d_h + dim), as directions in the
        residual stream."""
        s = self.shape
        return LayerStack([Matrix.of(w.output_weight.reshape(s.n_heads * s.head_dim, s.d_model), self.device,
                                     self._residual_gain(w.attention_post_norm)) for w in self._all_layer_weights()],
                          self.device)

    def _residual_gain(self, post_norm: NormParams | None) -> Tensor | None:
        """What multiplies a sublayer's vectors on their way into the residual, per dimension: a post-norm's
        gain γ and the residual multiplier (None: nothing)."""
        gain = None if post_norm is None else post_norm.weight
        if self.residual_multiplier == 1.0:
            return gain
        ones = torch.ones(self.shape.d_model, device=self.device)
        return (ones if gain is None else gain) * self.residual_multiplier

    def _all_layer_weights(self) -> list[LayerWeights]:
        return [self.layer_weights(l) for l in range(self.shape.n_layers)]

    def ffn_activation(self, layer: int) -> nn.Module:
        """The activation of a gated FFN's gate (SiLU for SwiGLU, GELU for Gemma's GeGLU)."""
        return self.mlp(layer).act_fn

    # --- norms: the block's topology (docs/method.md §1) ----------------------------------------------------
    def _norm_at(self, layer: int, path: str | None) -> NormParams:
        if path is None:
            return identity_norm(self.shape.d_model, self.device)
        return self._norm(self._in_layer(layer, path))

    def attention_norm(self, layer: int) -> NormParams:
        return self._norm_at(layer, self.paths.attention_norm)

    def ffn_norm(self, layer: int) -> NormParams:
        return self._norm_at(layer, self.paths.ffn_norm)

    def attention_post_norm_module(self, layer: int) -> nn.Module | None:
        """The norm applied to the attention output before it is added to the residual, if any."""
        path = self.paths.attention_post_norm
        return None if path is None else self._in_layer(layer, path)

    def ffn_post_norm_module(self, layer: int) -> nn.Module | None:
        """The norm applied to the FFN output before it is added to the residual, if any."""
        path = self.paths.ffn_post_norm
        return None if path is None else self._in_layer(layer, path)

    def post_norms(self, layer: int) -> dict[str, NormParams | None]:
        """The keyword arguments of LayerWeights for the post-norms."""
        attention, ffn = self.attention_post_norm_module(layer), self.ffn_post_norm_module(layer)
        return {"attention_post_norm": None if attention is None else self._norm(attention),
                "ffn_post_norm": None if ffn is None else self._norm(ffn)}

    def post_norm_params(self, layer: int, kind: str) -> NormParams:
        """The post-norm after the layer's "attention" or "ffn" sublayer (which must have one)."""
        weights = self.layer_weights(layer)
        norm = weights.attention_post_norm if kind == "attention" else weights.ffn_post_norm
        if norm is None:
            raise ValueError(f"layer {layer} has no {kind} post-norm")
        return norm

    def forget_weights(self) -> None:
        """Drop what was derived from the weights (call after the model's weights were replaced)."""
        self._layer_cache.clear()
        for name in ("unembedding_matrix", "max_unembedding_norm", "ffn_value_stack", "output_weight_stack"):
            self.__dict__.pop(name, None)


# LayerWeights' parts that are vectors of the hidden size (or smaller): moved to the scoring device once.
_SMALL_PARTS = ("attention_norm", "ffn_norm", "value_bias", "output_bias", "ffn_bias", "attention_post_norm",
                "ffn_post_norm")
