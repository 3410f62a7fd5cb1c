"""Llama and the families built the same way (Mistral, Qwen2, Qwen3): RMSNorm, SwiGLU MLP, grouped-query attention.

Qwen2 adds biases to q/k/v; the value bias is part of the value state and is read here. Qwen3 normalises queries
and keys per head, which changes the attention weights (read from the model) but neither values nor outputs.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import FamilyAdapter, LayerWeights, ModelShape, NormParams, as_f32, norm_from_module


def _optional_f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else as_f32(t)


class LlamaAdapter(FamilyAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def _layer(self, layer: int) -> nn.Module:
        return self.hf_model.model.layers[layer]

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.hf_model.model.layers)

    def attention(self, layer: int) -> nn.Module:
        return self._layer(layer).self_attn

    def value_source(self, layer: int) -> nn.Module:
        return self._layer(layer).self_attn.v_proj

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        batch, tokens, _ = output.shape
        return output.reshape(batch, tokens, self.shape.n_kv_heads, self.shape.head_dim)

    def attention_output_projection(self, layer: int) -> nn.Module:
        return self._layer(layer).self_attn.o_proj

    def mlp(self, layer: int) -> nn.Module:
        return self._layer(layer).mlp

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self._layer(layer).mlp.down_proj

    def final_norm_module(self) -> nn.Module:
        return self.hf_model.model.norm

    @property
    def shape(self) -> ModelShape:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return ModelShape(
            family=c.model_type,
            n_layers=c.num_hidden_layers,
            n_heads=heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            d_model=c.hidden_size,
            d_ffn=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=getattr(c, "max_position_embeddings", None),
            ffn_kind="swiglu",
            norm_kind="rmsnorm",
        )

    def _read_layer_weights(self, layer: int) -> LayerWeights:
        block, s = self._layer(layer), self.shape
        attn, mlp = block.self_attn, block.mlp
        value_bias = _optional_f32(attn.v_proj.bias)
        return LayerWeights(
            attention_norm=norm_from_module(block.input_layernorm, "rmsnorm"),
            ffn_norm=norm_from_module(block.post_attention_layernorm, "rmsnorm"),
            value_weight=as_f32(attn.v_proj.weight).reshape(s.n_kv_heads, s.head_dim, s.d_model),
            value_bias=None if value_bias is None else value_bias.reshape(s.n_kv_heads, s.head_dim),
            # o_proj.weight is (d, H·d_h); neuron (j, n) writes its column j·d_h+n.
            output_weight=as_f32(attn.o_proj.weight).T.reshape(s.n_heads, s.head_dim, s.d_model),
            output_bias=_optional_f32(attn.o_proj.bias),
            ffn_subkeys={"gate": as_f32(mlp.gate_proj.weight), "up": as_f32(mlp.up_proj.weight)},
            ffn_values=as_f32(mlp.down_proj.weight).T,
            ffn_bias=_optional_f32(mlp.down_proj.bias),
        )

    def final_norm(self) -> NormParams:
        return norm_from_module(self.hf_model.model.norm, "rmsnorm")

    def _read_unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = self.hf_model.lm_head
        return as_f32(head.weight), _optional_f32(head.bias)
