"""EXAONE 4: OLMo 2's block — no norm in front of the sublayers, each sublayer's output normalised before it is
added (`post_attention_layernorm`, `post_feedforward_layernorm`) — with per-head q/k norms and a SwiGLU MLP."""

from __future__ import annotations

from .olmo2 import Olmo2Adapter


class Exaone4Adapter(Olmo2Adapter):
    family = "exaone4"
    model_types = ("exaone4",)
