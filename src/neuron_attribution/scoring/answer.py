"""Multi-token answers by teacher forcing (docs/method.md §2): one context per answer token, the prefix that
predicts it; a neuron's score is the sum of its log-probability increases over those predicting positions.

An FFN neuron is the same (layer, neuron) in every prefix, with that prefix's last-position coefficient. An
attention neuron (layer, head, dim, source position p) exists in every prefix that can see p, so attention
neurons are indexed over the longest prefix's positions and count zero where p is not visible. Bounds add up,
so the exact top-k search of `topk` applies to the sums unchanged. Float32 math on the traces only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import value
from .context import ValueContext
from .exact import score_rows
from .topk import TopK, exact_top_k, rank_by_score


@dataclass
class AnswerScores:
    layers: tuple[Tensor, Tensor]  # (attention, ffn) per layer, summed over the answer tokens
    heads: Tensor  # (L, H), summed
    position_heads: list[tuple[int, int]]
    positions: Tensor  # (len(position_heads), T_max), summed
    ffn: TopK  # extra: (k, m) per-token scores
    attention: TopK  # flat indices into (L, H, d_h, T_max); extra: (k, m) per-token scores
    ffn_projection: Tensor  # (k, 2·projection) vocabulary ids of the returned FFN neurons (first token's sign)


def _padded(t: Tensor, width: int) -> Tensor:
    """Zeros appended along the last (position) axis up to `width`."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def answer_scores(contexts: list[ValueContext], k: int, n_position_heads: int, projection: int) -> AnswerScores:
    shape, width = contexts[0].shape, contexts[-1].trace.n_tokens
    layer_parts = [value.layer_scores(c) for c in contexts]
    layers = (torch.stack([a for a, _ in layer_parts]).sum(0), torch.stack([f for _, f in layer_parts]).sum(0))
    heads = torch.stack([value.head_scores(c) for c in contexts]).sum(0)
    flat = rank_by_score(heads.reshape(-1))
    position_heads = shape.head_indices(flat[:n_position_heads])
    positions = torch.stack([_padded(_position_scores(c, position_heads), width) for c in contexts]).sum(0)

    def ffn_scores(chunk: Tensor) -> tuple[Tensor, Tensor]:
        per_token = torch.stack([value.evaluate_ffn(c, chunk)[0] for c in contexts], dim=-1)  # (n, m)
        return per_token.sum(-1), per_token

    ffn = exact_top_k(sum(value.ffn_bounds(c) for c in contexts), ffn_scores, k)
    grid = shape.attention_grid(width)

    def attention_scores(chunk: Tensor) -> tuple[Tensor, Tensor]:
        layer, head, dim, position = torch.unravel_index(chunk, grid)
        per_token = torch.zeros(len(chunk), len(contexts), device=chunk.device)
        for i, c in enumerate(contexts):
            seen = position < c.trace.n_tokens
            own = shape.attention_grid(c.trace.n_tokens)
            local = ((layer[seen] * own[1] + head[seen]) * own[2] + dim[seen]) * own[3] + position[seen]
            per_token[seen, i] = value.evaluate_attention(c, local)
        return per_token.sum(-1), per_token

    attention_bounds = sum(_padded(value.attention_bounds(c), width) for c in contexts)
    attention = exact_top_k(attention_bounds, attention_scores, k)
    (projected,) = score_rows(contexts[0], [value.ffn_rows(contexts[0], ffn.indices, projection)])
    return AnswerScores(layers, heads, position_heads, positions, ffn, attention,
                        projected.projection if projected.projection is not None
                        else torch.empty(0, 0, dtype=torch.long, device=heads.device))


def _position_scores(ctx: ValueContext, heads: list[tuple[int, int]]) -> Tensor:
    (scored,) = score_rows(ctx, [value.head_position_rows(ctx, heads)])
    return scored.scores.reshape(len(heads), ctx.trace.n_tokens)
