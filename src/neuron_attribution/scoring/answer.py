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
    ffn: TopK  # extra: "per_token" (k, m) scores, "direct" parts (summed), and the first token's "projection"
    # ids and "target_push_rank" (docs/method.md §2)
    attention: TopK  # flat indices into (L, H, d_h, T_max); extra: the same, at the first position that sees it


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

    def ffn_scores(chunk: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        scored = [score_rows(c, [value.ffn_rows(c, chunk)])[0] for c in contexts]
        per_token = torch.stack([s.scores for s in scored], dim=-1)  # (n, m)
        return per_token.sum(-1), {"per_token": per_token, "direct": sum(s.direct for s in scored)}

    ffn = exact_top_k(sum(value.ffn_bounds(c) for c in contexts), ffn_scores, k)
    grid = shape.attention_grid(width)

    def attention_scores(chunk: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        per_token = torch.zeros(len(chunk), len(contexts), device=chunk.device)
        direct = torch.zeros(len(chunk), device=chunk.device)
        for i, c in enumerate(contexts):
            seen, local = _seen_by(c, chunk, grid)
            (scored,) = score_rows(c, [value.attention_rows(c, local)])
            per_token[seen, i] = scored.scores
            direct[seen] += scored.direct
        return per_token.sum(-1), {"per_token": per_token, "direct": direct}

    attention_bounds = sum(_padded(value.attention_bounds(c), width) for c in contexts)
    attention = exact_top_k(attention_bounds, attention_scores, k)
    (projected,) = score_rows(contexts[0], [value.ffn_rows(contexts[0], ffn.indices, projection)])
    _add(ffn, {"projection": projected.projection, "target_push_rank": projected.target_push_rank})
    _add(attention, _first_seen_details(contexts, attention.indices, grid, projection))
    return AnswerScores(layers, heads, position_heads, positions, ffn, attention)


def _seen_by(ctx: ValueContext, flat: Tensor, grid: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Which of the attention neurons (flat over the longest prefix's `grid`) this prefix sees, and their flat
    indices in its own (shorter) grid."""
    layer, head, dim, position = torch.unravel_index(flat, grid)
    seen = position < ctx.trace.n_tokens
    return seen, ctx.shape.attention_flat(layer[seen], head[seen], dim[seen], position[seen], ctx.trace.n_tokens)


def _first_seen_details(contexts: list[ValueContext], flat: Tensor, grid: tuple[int, int, int, int],
                        projection: int) -> dict[str, Tensor]:
    """Projection ids and the target's push rank of each attention neuron at the first predicting position that
    sees its source position (where its coefficient is read)."""
    ids = torch.zeros(len(flat), 2 * projection, dtype=torch.long, device=flat.device)
    ranks = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    done = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    for c in contexts:
        seen, local = _seen_by(c, flat, grid)
        new = seen & ~done
        if new.any():
            (scored,) = score_rows(c, [value.attention_rows(c, local[new[seen]], projection)])
            ids[new], ranks[new] = scored.projection, scored.target_push_rank
            done |= new
    return {"projection": ids, "target_push_rank": ranks}


def _add(top: TopK, details: dict[str, Tensor]) -> None:
    top.extra = {**(top.extra or {}), **details}


def _position_scores(ctx: ValueContext, heads: list[tuple[int, int]]) -> Tensor:
    (scored,) = score_rows(ctx, [value.head_position_rows(ctx, heads)])
    return scored.scores.reshape(len(heads), ctx.trace.n_tokens)
