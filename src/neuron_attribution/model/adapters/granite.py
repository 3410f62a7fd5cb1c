"""Granite (3.x): Llama's block with four multipliers — the embeddings (`embedding_multiplier`, before the first
layer, so inside the residual the trace reads), the attention scores (`attention_multiplier`, inside the
weights the trace reads), each sublayer's output before it is added (`residual_multiplier`) and the logits
(divided by `logits_scaling`)."""

from __future__ import annotations

from .llama import LlamaAdapter


class GraniteAdapter(LlamaAdapter):
    family = "granite"
    model_types = ("granite",)

    @property
    def residual_multiplier(self) -> float:
        return float(self.config.residual_multiplier)

    @property
    def logit_multiplier(self) -> float:
        return 1.0 / float(self.config.logits_scaling)
