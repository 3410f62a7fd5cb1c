"""The shared reading of blocks whose projections are nn.Linear (every family but GPT-2's Conv1D): value rows
from the value projection, attention output vectors and FFN value vectors from the columns of the output
projections, and one key per FFN neuron (a row of the input projection; SwiGLU families override this with their
gate and up rows). Registers no family itself."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import FamilyAdapter, LayerWeights, optional_f32, weight_of


class LinearAdapter(FamilyAdapter):
    mlp_input: ClassVar[str] = ""  # path, inside a layer, of a GELU FFN's input projection

    def _value_rows(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """(H_kv·d_h, d) value-projection rows (or already (H_kv, d_h, d)) and their optional bias."""
        projection = self.value_source(layer)
        return weight_of(projection), optional_f32(projection.bias)

    def _ffn_subkeys(self, layer: int) -> dict[str, Tensor]:
        return {"key": weight_of(self._in_layer(layer, self.mlp_input))}

    def _ffn_values(self, layer: int) -> Tensor:
        """(N, d): each FFN neuron's value vector, as the model holds it."""
        return weight_of(self.mlp_output_projection(layer)).T

    def _ffn_bias(self, layer: int) -> Tensor | None:
        return optional_f32(self.mlp_output_projection(layer).bias)

    def _read_layer_weights(self, layer: int) -> LayerWeights:
        s = self.shape
        value_rows, value_bias = self._value_rows(layer)
        output = self.attention_output_projection(layer)
        return LayerWeights(
            attention_norm=self.attention_norm(layer),
            ffn_norm=self.ffn_norm(layer),
            value_weight=value_rows.reshape(s.n_kv_heads, s.head_dim, s.d_model),
            value_bias=None if value_bias is None else value_bias.reshape(s.n_kv_heads, s.head_dim),
            output_weight=weight_of(output).T.reshape(s.n_heads, s.head_dim, s.d_model),
            output_bias=optional_f32(output.bias),
            ffn_subkeys=self._ffn_subkeys(layer),
            ffn_values=self._ffn_values(layer),
            ffn_bias=self._ffn_bias(layer),
            **self.post_norms(layer),
        )
