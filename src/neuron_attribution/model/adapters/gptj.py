"""GPT-J: a parallel block with one shared LayerNorm, h^l = h^{l-1} + A(ln h^{l-1}) + F(ln h^{l-1}); separate
q/k/v projections without biases, GELU MLP with biases, an output head with a bias."""

from __future__ import annotations

from .base import ModelPaths, ModelShape
from .linear import LinearAdapter


class GptJAdapter(LinearAdapter):
    family = "gptj"
    model_types = ("gptj",)
    paths = ModelPaths(layers="transformer.h", attention="attn", value="attn.v_proj", attention_output="attn.out_proj",
                       mlp="mlp", mlp_output="mlp.fc_out", final_norm="transformer.ln_f", attention_norm="ln_1",
                       ffn_norm="ln_1")
    mlp_input = "mlp.fc_in"

    @property
    def shape(self) -> ModelShape:
        c = self.config
        return ModelShape(
            family=self.family, n_layers=c.n_layer, n_heads=c.n_head, n_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head, d_model=c.n_embd, d_ffn=c.n_inner or 4 * c.n_embd,
            vocab_size=c.vocab_size, max_positions=c.n_positions, ffn_kind="gelu", norm_kind="layernorm",
            parallel=True)
