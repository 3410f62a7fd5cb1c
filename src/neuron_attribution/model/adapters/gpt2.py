"""GPT-2: LayerNorm, GELU MLP, Conv1D weights stored (in, out) (bitsandbytes quantizes them into linear layers,
(out, in)), fused QKV projection with biases."""

from __future__ import annotations

from torch import Tensor, nn

from ..quantization import DequantisedMatrix
from .base import FamilyAdapter, LayerWeights, ModelPaths, ModelShape, as_f32, native, rows_view, weight_of


class Gpt2Adapter(FamilyAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    paths = ModelPaths(layers="transformer.h", attention="attn", value="attn.c_attn", attention_output="attn.c_proj",
                       mlp="mlp", mlp_output="mlp.c_proj", final_norm="transformer.ln_f", attention_norm="ln_1",
                       ffn_norm="ln_2")

    def values_from_output(self, layer: int, output: Tensor) -> Tensor:
        d = self.shape.d_model
        return super().values_from_output(layer, output[..., 2 * d:])

    @property
    def shape(self) -> ModelShape:
        return self.shape_from_config("gelu", "layernorm", layers="n_layer", heads="n_head",
                                      hidden="n_embd", ffn="n_inner", positions="n_positions")

    def _read_layer_weights(self, layer: int) -> LayerWeights:
        block, s = self._layer(layer), self.shape
        d, heads, head_dim = s.d_model, s.n_heads, s.head_dim
        qkv_weight = _out_by_in(block.attn.c_attn)  # (3d, d)
        qkv_bias = as_f32(block.attn.c_attn.bias)
        return LayerWeights(
            attention_norm=self.attention_norm(layer),
            ffn_norm=self.ffn_norm(layer),
            value_weight=rows_view(qkv_weight, slice(2 * d, 3 * d)).reshape(heads, head_dim, d),
            value_bias=qkv_bias[2 * d :].reshape(heads, head_dim),
            output_weight=_out_by_in(block.attn.c_proj).T.reshape(heads, head_dim, d),
            output_bias=as_f32(block.attn.c_proj.bias),
            ffn_subkeys={"key": _out_by_in(block.mlp.c_fc)},
            ffn_values=_out_by_in(block.mlp.c_proj).T,
            ffn_bias=as_f32(block.mlp.c_proj.bias),
        )


def _out_by_in(module: nn.Module) -> Tensor | DequantisedMatrix:
    """A projection's (out, in) matrix: a Conv1D's (in, out) weight transposed (a view), or the weight of the
    linear layer bitsandbytes put in its place when quantizing."""
    if type(module).__name__ == "Conv1D":
        return native(module.weight).T
    return weight_of(module)
