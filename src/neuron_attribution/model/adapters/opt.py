"""OPT: LayerNorm before each sublayer (`self_attn_layer_norm`, `final_layer_norm` — the FFN's, despite the name),
q/k/v/out projections with biases, a ReLU FFN `fc1` → `fc2` directly in the decoder layer (so `fc2` is both the
FFN's output and its output projection). OPT-350m's post-norm layout and its projections in and out of a
smaller embedding are refused: they are not the block this adapter declares."""

from __future__ import annotations

from ...errors import UserError
from .base import ModelPaths, ModelShape
from .linear import LinearAdapter


class OptAdapter(LinearAdapter):
    family = "opt"
    model_types = ("opt",)
    paths = ModelPaths(layers="model.decoder.layers", attention="self_attn", value="self_attn.v_proj",
                       attention_output="self_attn.out_proj", mlp="fc2", mlp_output="fc2",
                       final_norm="model.decoder.final_layer_norm", attention_norm="self_attn_layer_norm",
                       ffn_norm="final_layer_norm")
    mlp_input = "fc1"

    @property
    def shape(self) -> ModelShape:
        c = self.config
        if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size:
            raise UserError("this OPT model normalises after its sublayers or projects its embeddings (OPT-350m); "
                            "only the pre-norm OPT block is supported")
        return self.shape_from_config("relu", "layernorm", ffn="ffn_dim")
