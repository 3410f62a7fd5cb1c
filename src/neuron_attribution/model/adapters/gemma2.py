"""Gemma 2: Gemma's norms, plus "sandwich" norms — each sublayer's output is normalised before it is added to
the residual — and final logits soft-capped at `final_logit_softcapping` (docs/method.md §1). Here
`post_attention_layernorm` is the attention's post-norm and `pre_feedforward_layernorm` the FFN's input norm."""

from __future__ import annotations

from dataclasses import replace

from .gemma import GemmaAdapter
from .llama import LLAMA_PATHS

SANDWICH_PATHS = replace(LLAMA_PATHS, ffn_norm="pre_feedforward_layernorm",
                         attention_post_norm="post_attention_layernorm", ffn_post_norm="post_feedforward_layernorm")


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    paths = SANDWICH_PATHS
