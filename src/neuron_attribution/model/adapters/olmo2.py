"""OLMo 2 and OLMo 3 (the same block; OLMo 3 adds sliding-window layers): no norm in front of the sublayers;
each sublayer's output is normalised before it is added (post-norms named `post_attention_layernorm` and
`post_feedforward_layernorm`), SwiGLU MLP, q/k norms over all heads."""

from __future__ import annotations

from dataclasses import replace

from .llama import LLAMA_PATHS, LlamaAdapter


class Olmo2Adapter(LlamaAdapter):
    family = "olmo2"
    model_types = ("olmo2", "olmo3")
    paths = replace(LLAMA_PATHS, attention_norm=None, ffn_norm=None, attention_post_norm="post_attention_layernorm",
                    ffn_post_norm="post_feedforward_layernorm")
