"""GLM-4: "sandwich" norms — `input_layernorm` before the attention, `post_self_attn_layernorm` on its output,
`post_attention_layernorm` before the MLP, `post_mlp_layernorm` on its output — RMSNorm, a SwiGLU MLP with the
gate and up rows fused in `gate_up_proj` (gate rows first), grouped-query attention with partial rotary."""

from __future__ import annotations

from dataclasses import replace

from .llama import LLAMA_PATHS, LlamaAdapter


class Glm4Adapter(LlamaAdapter):
    family = "glm4"
    model_types = ("glm4",)
    paths = replace(LLAMA_PATHS, attention_post_norm="post_self_attn_layernorm", ffn_post_norm="post_mlp_layernorm")
    fused_gate_up = True
