"""GPT-2: LayerNorm, GELU MLP, Conv1D weights stored (in, out), fused QKV projection with biases."""

from __future__ import annotations

from torch import Tensor, nn

from .base import FamilyAdapter, LayerWeights, ModelShape, NormParams, as_f32, norm_from_module


class Gpt2Adapter(FamilyAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def _block(self, layer: int) -> nn.Module:
        return self.hf_model.transformer.h[layer]

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.hf_model.transformer.h)

    def attention(self, layer: int) -> nn.Module:
        return self._block(layer).attn

    def value_source(self, layer: int) -> nn.Module:
        return self._block(layer).attn.c_attn

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        d = self.shape.d_model
        batch, tokens, _ = output.shape
        return output[..., 2 * d :].reshape(batch, tokens, self.shape.n_heads, self.shape.head_dim)

    def attention_output_projection(self, layer: int) -> nn.Module:
        return self._block(layer).attn.c_proj

    def mlp(self, layer: int) -> nn.Module:
        return self._block(layer).mlp

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self._block(layer).mlp.c_proj

    def final_norm_module(self) -> nn.Module:
        return self.hf_model.transformer.ln_f

    @property
    def shape(self) -> ModelShape:
        c = self.config
        return ModelShape(
            family=self.family,
            n_layers=c.n_layer,
            n_heads=c.n_head,
            n_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head,
            d_model=c.n_embd,
            d_ffn=c.n_inner or 4 * c.n_embd,
            vocab_size=c.vocab_size,
            max_positions=c.n_positions,
            ffn_kind="gelu",
            norm_kind="layernorm",
        )

    def _read_layer_weights(self, layer: int) -> LayerWeights:
        block, s = self._block(layer), self.shape
        d, heads, head_dim = s.d_model, s.n_heads, s.head_dim
        qkv_weight = as_f32(block.attn.c_attn.weight)  # (d, 3d)
        qkv_bias = as_f32(block.attn.c_attn.bias)
        return LayerWeights(
            attention_norm=norm_from_module(block.ln_1, "layernorm"),
            ffn_norm=norm_from_module(block.ln_2, "layernorm"),
            value_weight=qkv_weight[:, 2 * d :].T.reshape(heads, head_dim, d).contiguous(),
            value_bias=qkv_bias[2 * d :].reshape(heads, head_dim).contiguous(),
            output_weight=as_f32(block.attn.c_proj.weight).reshape(heads, head_dim, d).contiguous(),
            output_bias=as_f32(block.attn.c_proj.bias),
            ffn_subkeys={"key": as_f32(block.mlp.c_fc.weight).T.contiguous()},
            ffn_values=as_f32(block.mlp.c_proj.weight).contiguous(),
            ffn_bias=as_f32(block.mlp.c_proj.bias),
        )

    def final_norm(self) -> NormParams:
        return norm_from_module(self.hf_model.transformer.ln_f, "layernorm")

    def _read_unembedding(self) -> tuple[Tensor, Tensor | None]:
        head = self.hf_model.lm_head
        return as_f32(head.weight), None if head.bias is None else as_f32(head.bias)
