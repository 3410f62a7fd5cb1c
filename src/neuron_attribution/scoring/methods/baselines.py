"""FFN-neuron scorers: the proposed log-probability increase and the paper's seven baselines (docs/method.md §4).

Each scorer is one small class behind one interface: `scores(ctx)` gives every FFN neuron's score as an
(L, N) array, higher = more important; `top(ctx, k)` gives the k best as flat indices layer·N + neuron, best
first, ties to the lower index. The static scorers read only the one forward pass in the context (and the
weights). Those whose score needs the whole vocabulary find their top-k exactly through a concavity bound,
as the proposed method does, instead of scoring every neuron against the vocabulary.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..context import ValueContext
from ..exact import score_rows
from ..ranks import VocabularyRanks
from ..topk import BOUND_SLACK, exact_top_k, rank_by_score
from ..value import (active_ffn_rows, dense_ffn_scores, evaluate_ffn, ffn_bounds, ffn_coefficients, ffn_rows,
                     soft_capped_reach, top_ffn)
from .base import FfnScorer, MethodResources


def _exact_top(bounds: Tensor, evaluate: Callable[[Tensor], Tensor], k: int) -> Tensor:
    return exact_top_k(bounds, lambda flat: (evaluate(flat), None), k).indices


class LogProbIncrease(FfnScorer):
    key = "log_prob_increase"
    description = "log p(w | x+v) − log p(w | x): the proposed method"

    def scores(self, ctx: ValueContext) -> Tensor:
        return dense_ffn_scores(ctx)

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        return top_ffn(ctx, k).indices


class LogProbability(FfnScorer):
    """log p(w | v): the neuron's vector read alone, as if it were the whole residual.

    log p(w | c·u) is concave in c (log-sum-exp is convex), so it lies below its tangent at c = 0, and below 0.
    Soft-capped logits (Gemma 2) are not linear in c and the tangent is no bound there; the proved reach of
    |c|·u on the target's log-probability is (`soft_capped_reach`)."""

    key = "log_probability"
    description = "log p(w | v): the neuron alone, no context"

    def _evaluate(self, ctx: ValueContext, flat: Tensor) -> Tensor:
        rows = ffn_rows(ctx, flat)
        (scored,) = score_rows(ctx, [replace(rows, bases=torch.full_like(rows.bases, ctx.zero_state))])
        return scored.scores + ctx.target_log_probs[ctx.zero_state]

    def _bounds(self, ctx: ValueContext) -> Tensor:
        if ctx.readout.softcap is not None:
            increase = ffn_coefficients(ctx).abs() * soft_capped_reach(ctx, ctx.ffn_values)
        else:
            increase = ffn_coefficients(ctx) * ctx.ffn_values.dots(ctx.alone_direction.expand(ctx.shape.n_layers, -1),
                                                                   active_ffn_rows(ctx))
        return (ctx.target_log_probs[ctx.zero_state] + increase).clamp(max=0.0)

    def scores(self, ctx: ValueContext) -> Tensor:
        flat = torch.arange(ctx.shape.n_layers * ctx.shape.d_ffn, device=ctx.device)
        return self._evaluate(ctx, flat).reshape(ctx.shape.n_layers, ctx.shape.d_ffn)

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        return _exact_top(self._bounds(ctx), lambda flat: self._evaluate(ctx, flat), k)


class ProbIncrease(FfnScorer):
    """p(w | x+v) − p(w | x) = p(w | x)·(exp(Imp) − 1): increasing in Imp for a fixed base, so the
    log-probability increase's bound carries over through the same function."""

    key = "prob_increase"
    description = "p(w | x+v) − p(w | x)"

    @staticmethod
    def _base_probs(ctx: ValueContext) -> Tensor:
        return ctx.target_log_probs[1: ctx.final_state: 2].exp().unsqueeze(-1)  # (L, 1)

    def scores(self, ctx: ValueContext) -> Tensor:
        return self._base_probs(ctx) * torch.expm1(dense_ffn_scores(ctx))

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        base = self._base_probs(ctx)
        bounds = base * torch.expm1(ffn_bounds(ctx) + BOUND_SLACK)
        return _exact_top(bounds, lambda flat: base[ctx.shape.ffn_unflat(flat)[0], 0]
                          * torch.expm1(evaluate_ffn(ctx, flat)), k)


def value_norms(ctx: ValueContext) -> Tensor:
    return ctx.ffn_values.norms()  # (L, N)


class Norm(FfnScorer):
    key = "norm"
    description = "‖fc2‖: the value vector's norm (weights only)"

    def scores(self, ctx: ValueContext) -> Tensor:
        return value_norms(ctx)


class Coefficient(FfnScorer):
    key = "coefficient"
    description = "m: the neuron's coefficient at the last position (signed)"

    def scores(self, ctx: ValueContext) -> Tensor:
        return ffn_coefficients(ctx).clone()


class _RankScorer(FfnScorer):
    """A scorer that reads where the target ranks in the value vectors' vocabulary projections."""

    needs_ranks = True

    def __init__(self, ranks: VocabularyRanks):
        self.ranks = ranks

    @classmethod
    def create(cls, resources: MethodResources) -> _RankScorer:
        return cls(resources.ranks())


class Rank(_RankScorer):
    key = "rank"
    description = "−rank of w in the vocabulary projection of fc2 (weights only)"

    def scores(self, ctx: ValueContext) -> Tensor:
        return -self.ranks.full(ctx.target)[0].float()

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        from_top, _ = self.ranks.known(ctx.target)
        candidates = from_top.nonzero().squeeze(-1)
        if candidates.numel() < k:  # fewer than k neurons rank the target within the kept depth
            return super().top(ctx, k)
        return candidates[rank_by_score(-from_top[candidates].float(), candidates)[:k]]


class CoefficientTimesNorm(FfnScorer):
    key = "coefficient_x_norm"
    description = "|m|·‖fc2‖ = ‖v‖"

    def scores(self, ctx: ValueContext) -> Tensor:
        return ffn_coefficients(ctx).abs() * value_norms(ctx)


class CoefficientTimesRank(_RankScorer):
    """|m| / rank of w in the projection of v = m·fc2: where m < 0 the projection is reversed, so the rank is
    counted from the bottom of fc2's projection."""

    key = "coefficient_x_rank"
    description = "|m| / rank of w in the vocabulary projection of v = m·fc2"

    @staticmethod
    def _signed_rank(m: Tensor, from_top: Tensor, from_bottom: Tensor) -> Tensor:
        return torch.where(m < 0, from_bottom, from_top).float()

    def scores(self, ctx: ValueContext) -> Tensor:
        return ffn_coefficients(ctx).abs() / self._signed_rank(ffn_coefficients(ctx), *self.ranks.full(ctx.target))

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        m = ffn_coefficients(ctx).reshape(-1)
        known = self._signed_rank(m, *self.ranks.known(ctx.target))
        # Where the rank is beyond the kept depth it is at least depth + 1: an upper bound on |m| / rank.
        bounds = m.abs() / torch.where(known > 0, known, float(self.ranks.depth + 1))

        def evaluate(flat: Tensor) -> Tensor:
            rank = known[flat].clone()
            missing = (rank == 0).nonzero().squeeze(-1)
            if missing.numel():
                rank[missing] = self._signed_rank(m[flat[missing]], *self.ranks.exact(flat[missing], ctx.target))
            return m[flat].abs() / rank

        return _exact_top(bounds, evaluate, k)


class RandomControl(FfnScorer):
    """Seeded random scores: a control. The stream depends on the seed, the prompt's tokens and the target, so
    a sentence gets the same neurons wherever and in whatever order it is run."""

    key = "random"
    description = "random neurons (seeded control)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    @classmethod
    def create(cls, resources: MethodResources) -> RandomControl:
        return cls(resources.seed)

    def scores(self, ctx: ValueContext) -> Tensor:
        # Drawn on the CPU, then moved: the same seed gives the same neurons on every device.
        generator = torch.Generator(device="cpu").manual_seed(sentence_seed(self.seed, ctx.trace.token_ids.tolist(),
                                                                            ctx.target))
        return torch.rand(ctx.shape.n_layers, ctx.shape.d_ffn, generator=generator, device="cpu").to(ctx.device)


def sentence_seed(seed: int, token_ids: Sequence[int], target: int) -> int:
    payload = ",".join(map(str, [seed, target, *token_ids])).encode()
    return zlib.crc32(payload)
