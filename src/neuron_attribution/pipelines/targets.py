"""The target of an attribution: its token, probability and rank (and a contrast's), shared by the pipelines."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_contrast, encode_target, token_texts
from ..model.trace import Trace
from ..neurons import ModelShape
from ..results.attribution import HeadScore, TargetInfo, TokenInfo

PROJECTION_TOKENS = 10  # vocabulary tokens kept at each end of an FFN neuron's projection
TOP_HEADS_WITH_POSITIONS = 5

Target = str | int | None  # answer text (its first token is scored), a token id, or None: the top prediction


def target_info(model: LoadedModel, prompt: Prompt, ids: list[int], trace: Trace, target: Target,
                contrast: Target = None) -> TargetInfo:
    """The target's token, and its probability and rank under the model (None: the top prediction); the same
    for a contrast token if one is given."""
    token = encode_target(model, ids, prompt, int(trace.logits.argmax()) if target is None else target)
    probs = torch.softmax(trace.logits.double(), dim=-1)
    first = token_info(probs, token.id, token.text)
    info = TargetInfo(first.text, first.id, first.prob, first.rank, token.n_answer_tokens)
    if token.n_answer_tokens > 1:
        info.answer = "".join(token_texts(model, list(token.answer_ids)))
    if contrast is not None:
        other = encode_contrast(model, ids, prompt, contrast, token.id)
        info.contrast = token_info(probs, other.id, other.text)
    return info


def token_info(probs: Tensor, token_id: int, text: str) -> TokenInfo:
    """A token's probability and rank (1 = the top prediction) under one position's next-token distribution."""
    return TokenInfo(text, token_id, float(probs[token_id]), int((probs > probs[token_id]).sum()) + 1)


def ranked_heads(shape: ModelShape, scores: Tensor, direct: Tensor | None = None) -> list[HeadScore]:
    """Every head with its score, best first (ties in (layer, head) order), from (L, H) scores on any device."""
    score_of = scores.detach().cpu().tolist()  # Python numbers: indexing a tensor 3·L·H times costs milliseconds
    direct_of = None if direct is None else direct.detach().cpu().tolist()
    heads = []
    for i in shape.head_indices(torch.arange(scores.numel(), device="cpu")):
        score = score_of[i.layer][i.head]
        part = None if direct_of is None else direct_of[i.layer][i.head]
        heads.append(HeadScore(i.layer, i.head, score, direct_score=part,
                               normaliser_change=None if part is None else part - score))
    return sorted(heads, key=lambda h: -h.score)


def prompt_text(model: LoadedModel, prompt: Prompt, ids: list[int]) -> str:
    return prompt if isinstance(prompt, str) else "".join(token_texts(model, ids))
