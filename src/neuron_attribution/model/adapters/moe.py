"""Mixture-of-experts families built on Llama's block: Mixtral, Qwen3-MoE and OLMoE (routed experts only),
Qwen2-MoE (plus a shared expert whose output a sigmoid gate scales), Granite-MoE (Granite's multipliers), PhiMoE
(LayerNorms with biases) and FlexOlmo (OLMo 2's post-norms only).

Each layer's FFN is a router and one experts module with 3-D weights (`model/experts.py` reads it through the
router's choice); the layer's FFN neurons are every expert's, expert by expert, then the shared expert's
(docs/method.md §1). Every layer must be a mixture: models that mix dense and sparse layers are refused."""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import ClassVar

from torch import Tensor, nn

from ...errors import UserError
from .. import experts as moe
from ..weights import RowParts
from .base import ModelShape, NormKind, weight_of
from .granite import GraniteAdapter
from .llama import LLAMA_PATHS, LlamaAdapter
from .olmo import OlmoAdapter
from .olmo2 import Olmo2Adapter


class MixtureOfExpertsAdapter(LlamaAdapter):
    family = "mixtral"
    model_types = ("mixtral", "qwen3_moe")
    paths = replace(LLAMA_PATHS, mlp_output=None)
    experts_path: ClassVar[str] = "mlp.experts"
    shared_path: ClassVar[str | None] = None  # the shared expert, an ordinary gated MLP
    shared_gate_path: ClassVar[str | None] = None
    norm_kind: ClassVar[NormKind] = "rmsnorm"

    def __init__(self, hf_model: nn.Module):
        super().__init__(hf_model)
        for layer in range(len(self.decoder_layers())):
            module = self.experts(layer)
            if module is None:
                raise UserError(f"layer {layer} of this {self.config.model_type} model has a dense FFN beside "
                                "mixture-of-experts layers, which no adapter reads yet")
            moe.check_readable(module, layer)

    def experts(self, layer: int) -> nn.Module | None:
        try:
            return self._in_layer(layer, self.experts_path)
        except AttributeError:
            return None

    def _shared(self, layer: int) -> nn.Module | None:
        return None if self.shared_path is None else self._in_layer(layer, self.shared_path)

    def shared_expert_gate(self, layer: int) -> nn.Module | None:
        return None if self.shared_gate_path is None else self._in_layer(layer, self.shared_gate_path)

    @cached_property
    def shape(self) -> ModelShape:
        module, shared = self.experts(0), self._shared(0)
        width = moe.expert_width(module)
        shared_width = 0 if shared is None else int(shared.down_proj.in_features)
        dense = self.shape_from_config(ffn_kind="swiglu", norm_kind=self.norm_kind)
        return replace(dense, d_ffn=module.num_experts * width + shared_width, n_experts=int(module.num_experts),
                       experts_per_token=int(self.config.num_experts_per_tok), expert_ffn=width)

    def _ffn_subkeys(self, layer: int) -> dict[str, RowParts]:
        module, shared = self.experts(layer), self._shared(layer)
        per_expert = [moe.input_subkeys(module, e) for e in range(module.num_experts)]
        names = per_expert[0].keys()
        extra = {} if shared is None else {"gate": weight_of(shared.gate_proj), "up": weight_of(shared.up_proj)}
        return {name: RowParts([keys[name] for keys in per_expert] + ([extra[name]] if extra else []))
                for name in names}

    def _ffn_values(self, layer: int) -> RowParts:
        module, shared = self.experts(layer), self._shared(layer)
        rows = [moe.value_rows(module, e) for e in range(module.num_experts)]
        return RowParts(rows + ([] if shared is None else [weight_of(shared.down_proj).T]))

    def _ffn_bias(self, layer: int) -> Tensor | None:
        return None

    def ffn_activation(self, layer: int):
        return self.experts(layer).act_fn


class Qwen2MoeAdapter(MixtureOfExpertsAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    paths = replace(LLAMA_PATHS, mlp_output="mlp.shared_expert.down_proj")
    shared_path = "mlp.shared_expert"
    shared_gate_path = "mlp.shared_expert_gate"


class OlmoeAdapter(MixtureOfExpertsAdapter):
    """OLMoE normalises queries and keys over the whole projection (attention weights only, read from the
    model); `clip_qkv` would clamp the value states, so such configs are refused as for OLMo."""

    family = "olmoe"
    model_types = ("olmoe",)

    @cached_property
    def shape(self) -> ModelShape:
        OlmoAdapter.refuse_clipped_values(self.config)
        return super().shape


class GraniteMoeAdapter(MixtureOfExpertsAdapter):
    """Granite's multipliers (residual, logits; embedding and attention inside what the trace reads) around
    routed experts."""

    family = "granitemoe"
    model_types = ("granitemoe",)
    paths = replace(LLAMA_PATHS, mlp="block_sparse_moe", mlp_output=None)
    experts_path = "block_sparse_moe.experts"
    residual_multiplier = GraniteAdapter.residual_multiplier
    logit_multiplier = GraniteAdapter.logit_multiplier


class PhimoeAdapter(MixtureOfExpertsAdapter):
    family = "phimoe"
    model_types = ("phimoe",)
    norm_kind = "layernorm"


class FlexOlmoAdapter(MixtureOfExpertsAdapter):
    family = "flex_olmo"
    model_types = ("flex_olmo",)
    paths = replace(Olmo2Adapter.paths, mlp_output=None)
