"""`direct_parts()`: every neuron's direct part at once (docs/method.md §2) — the change of the target's logit its
contribution makes, the first of a score's two parts — for one d-sized product per neuron: no vocabulary-sized
product, so a whole model's worth costs about a forward pass. What peers compare with logit attribution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt, token_texts
from ..model.trace import trace_token_ids
from ..results.attribution import TargetInfo
from ..scoring import value
from ..scoring.context import value_context
from ..settings import ScoringOptions
from .targets import target_info


@dataclass
class DirectParts:
    """Every FFN neuron's direct part (L, N) at the last position and every attention neuron's (L, H, d_h, T) by
    source position, for `target` (its first token), with the prompt's `tokens`. An FFN neuron (l, k) is
    `ffn[l, k]`; an attention neuron l_j_n@p is `attention[l, j, n, p]`."""

    ffn: np.ndarray
    attention: np.ndarray
    target: TargetInfo
    tokens: list[str]


def direct_parts(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *,
                 options: ScoringOptions | None = None) -> DirectParts:
    """Every neuron's direct part for `prompt` → `target` (text, a token id, or None for the top prediction)."""
    options = options or ScoringOptions()
    ids = encode_prompt(model, prompt)
    (trace,) = trace_token_ids(model, [ids])
    info = target_info(model, prompt, ids, trace, target)
    ctx = value_context(model, trace, info.id, reference=options.reference, memory_budget=options.memory_budget,
                        budget_fixed=options.budget_fixed)
    return DirectParts(value.ffn_direct_parts(ctx).cpu().numpy(), value.attention_direct_parts(ctx).cpu().numpy(),
                       info, token_texts(model, ids))
