"""FFN-neuron scorers: the proposed log-probability increase and the paper's seven baselines (METHOD.md §4).

Each scorer is one small class behind one interface: `scores(ctx)` gives every FFN neuron's score as an
(L, N) array, higher = more important; `top(ctx, k)` gives the k best as flat indices layer·N + neuron, best
first, ties to the lower index. The static scorers read only the one forward pass in the context (and the
weights). Those whose score needs the whole vocabulary find their top-k exactly through a concavity bound,
as the proposed method does, instead of scoring every neuron against the vocabulary.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import replace
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .value import (ValueContext, _BOUND_SLACK, dense_ffn_scores, evaluate_ffn, exact_top_k, ffn_bounds,
                    ffn_coefficients, ffn_rows, rank_by_score, score_rows, top_ffn)


class FfnScorer(ABC):
    key: ClassVar[str]
    description: ClassVar[str]
    static: ClassVar[bool] = True  # False: runs the model again (slower)

    @abstractmethod
    def scores(self, ctx: ValueContext) -> Tensor:
        """(L, N) score of every FFN neuron."""

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        """Flat indices of the k best neurons, best first."""
        flat = self.scores(ctx).reshape(-1)
        return rank_by_score(flat, torch.arange(flat.numel()))[:k]


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

    log p(w | c·u) is concave in c (log-sum-exp is convex), so it lies below its tangent at c = 0, and below 0."""

    key = "log_probability"
    description = "log p(w | v): the neuron alone, no context"

    def _evaluate(self, ctx: ValueContext, flat: Tensor) -> Tensor:
        rows = ffn_rows(ctx, flat)
        (scored,) = score_rows(ctx, [replace(rows, bases=torch.full_like(rows.bases, ctx.zero_state))])
        return scored.scores + ctx.target_log_probs[ctx.zero_state]

    def _bounds(self, ctx: ValueContext) -> Tensor:
        slopes = torch.einsum("lnd,d->ln", ctx.ffn_values, ctx.alone_direction)
        tangent = ctx.target_log_probs[ctx.zero_state] + ffn_coefficients(ctx) * slopes
        return tangent.clamp(max=0.0)

    def scores(self, ctx: ValueContext) -> Tensor:
        flat = torch.arange(ctx.shape.n_layers * ctx.shape.d_ffn)
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
        n = ctx.shape.d_ffn
        bounds = base * torch.expm1(ffn_bounds(ctx) + _BOUND_SLACK)
        return _exact_top(bounds, lambda flat: base[flat // n, 0] * torch.expm1(evaluate_ffn(ctx, flat)[0]), k)


def value_norms(ctx: ValueContext) -> Tensor:
    return ctx.ffn_values.norm(dim=-1)  # (L, N)


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


class CoefficientTimesNorm(FfnScorer):
    key = "coefficient_x_norm"
    description = "|m|·‖fc2‖ = ‖v‖"

    def scores(self, ctx: ValueContext) -> Tensor:
        return ffn_coefficients(ctx).abs() * value_norms(ctx)


class VocabularyRanks:
    """Rank of a target token in the vocabulary projection U(γ ⊙ centre(fc2)) of every FFN value vector,
    counted from the top (rank 1 = the token the vector promotes most) and from the bottom. A property of the
    weights alone.

    One pass over the weights keeps each vector's `depth` highest and lowest projection values. A token among
    them has its rank read off exactly (every value above it is there too); any other token's rank is known to
    exceed `depth`. The few neurons whose exact rank beyond that still matters are projected again one by one."""

    def __init__(self, ffn_values: Tensor, norm_weight: Tensor, centre: bool, unembedding: Tensor,
                 depth: int = 256, batch: int = 512):
        layers, n, d = ffn_values.shape
        self.shape = (layers, n)
        self.flat_values = ffn_values.reshape(-1, d)
        self.norm_weight, self.centre, self.unembedding = norm_weight, centre, unembedding
        self.depth, self.batch = min(depth, unembedding.shape[0]), batch
        self._extremes: dict[str, tuple[Tensor, Tensor]] | None = None  # "top"/"bottom" -> (ids, values)
        self._full: dict[int, tuple[Tensor, Tensor]] = {}

    def _project(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        if self.centre:
            rows = rows - rows.mean(dim=-1, keepdim=True)
        return torch.matmul(rows * self.norm_weight, self.unembedding.T, out=out)

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The pass over the weights (once)."""
        if self._extremes is not None:
            return
        total, k = self.flat_values.shape[0], self.depth
        kept = {side: (torch.empty(total, k, dtype=torch.int32), torch.empty(total, k)) for side in ("top", "bottom")}
        buffer = torch.empty(self.batch, self.unembedding.shape[0])
        for start in range(0, total, self.batch):
            rows = slice(start, min(start + self.batch, total))
            projected = self._project(self.flat_values[rows], out=buffer[: rows.stop - rows.start])
            for side, largest in (("top", True), ("bottom", False)):
                values, ids = projected.topk(k, dim=-1, largest=largest)
                kept[side][0][rows], kept[side][1][rows] = ids.int(), values
            if progress is not None:
                progress(rows.stop, total)
        self._extremes = kept

    def known(self, target: int) -> tuple[Tensor, Tensor]:
        """(from_top, from_bottom), each (L·N,) int: the exact rank where it is at most `depth`, else 0."""
        self.prepare()
        result = []
        for side in ("top", "bottom"):
            ids, values = self._extremes[side]
            hit = ids == target  # (L·N, depth), at most one per row
            present = hit.any(dim=-1)
            at_target = torch.where(hit, values, torch.zeros(())).sum(dim=-1, keepdim=True)
            beyond = values > at_target if side == "top" else values < at_target
            ranks = (beyond & present.unsqueeze(-1)).sum(dim=-1) + 1
            result.append(torch.where(present, ranks, torch.zeros_like(ranks)))
        return result[0], result[1]

    def exact(self, flat: Tensor, target: int) -> tuple[Tensor, Tensor]:
        """(from_top, from_bottom) ranks of `target` for the neurons at flat indices, by projecting them."""
        vocabulary = self.unembedding.shape[0]
        projected_buffer = torch.empty(min(self.batch, flat.numel()), vocabulary)
        compared = torch.empty(projected_buffer.shape, dtype=torch.bool)
        from_top, from_bottom = [], []
        for start in range(0, flat.numel(), self.batch):
            rows = flat[start: start + self.batch]
            projected = self._project(self.flat_values[rows], out=projected_buffer[: rows.numel()])
            at_target = projected[:, target: target + 1].clone()
            out = compared[: rows.numel()]
            from_top.append(torch.gt(projected, at_target, out=out).sum(dim=-1) + 1)
            from_bottom.append(torch.lt(projected, at_target, out=out).sum(dim=-1) + 1)
        if not from_top:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        return torch.cat(from_top), torch.cat(from_bottom)

    def full(self, target: int) -> tuple[Tensor, Tensor]:
        """(from_top, from_bottom), each (L, N): every neuron's exact ranks (a pass over the weights; kept)."""
        if target not in self._full:
            from_top, from_bottom = self.exact(torch.arange(self.flat_values.shape[0]), target)
            self._full[target] = (from_top.reshape(self.shape), from_bottom.reshape(self.shape))
        return self._full[target]


class Rank(FfnScorer):
    key = "rank"
    description = "−rank of w in the vocabulary projection of fc2 (weights only)"

    def __init__(self, ranks: VocabularyRanks):
        self.ranks = ranks

    def scores(self, ctx: ValueContext) -> Tensor:
        return -self.ranks.full(ctx.target)[0].float()

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        from_top, _ = self.ranks.known(ctx.target)
        candidates = from_top.nonzero().squeeze(-1)
        if candidates.numel() < k:  # fewer than k neurons rank the target within the kept depth
            return super().top(ctx, k)
        return candidates[rank_by_score(-from_top[candidates].float(), candidates)[:k]]


class CoefficientTimesRank(FfnScorer):
    """|m| / rank of w in the projection of v = m·fc2: where m < 0 the projection is reversed, so the rank is
    counted from the bottom of fc2's projection."""

    key = "coefficient_x_rank"
    description = "|m| / rank of w in the vocabulary projection of v = m·fc2"

    def __init__(self, ranks: VocabularyRanks):
        self.ranks = ranks

    @staticmethod
    def _signed_rank(m: Tensor, from_top: Tensor, from_bottom: Tensor) -> Tensor:
        return torch.where(m < 0, from_bottom, from_top).float()

    def scores(self, ctx: ValueContext) -> Tensor:
        return ffn_coefficients(ctx).abs() / self._signed_rank(ffn_coefficients(ctx), *self.ranks.full(ctx.target))

    def top(self, ctx: ValueContext, k: int) -> Tensor:
        m = ffn_coefficients(ctx).reshape(-1)
        known = self._signed_rank(m, *self.ranks.known(ctx.target))
        # Where the rank is beyond the kept depth it is at least depth + 1: an upper bound on |m| / rank.
        bounds = m.abs() / torch.where(known > 0, known, torch.tensor(float(self.ranks.depth + 1)))

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

    def scores(self, ctx: ValueContext) -> Tensor:
        generator = torch.Generator().manual_seed(sentence_seed(self.seed, ctx.trace.token_ids, ctx.target))
        return torch.rand(ctx.shape.n_layers, ctx.shape.d_ffn, generator=generator)


def sentence_seed(seed: int, token_ids: Tensor, target: int) -> int:
    payload = ",".join(map(str, [seed, target, *token_ids.tolist()])).encode()
    return zlib.crc32(payload)


STATIC_KEYS = ("log_prob_increase", "log_probability", "prob_increase", "norm", "coefficient", "rank",
               "coefficient_x_norm", "coefficient_x_rank")


def static_scorers(ranks: VocabularyRanks | None, seed: int = 0) -> dict[str, FfnScorer]:
    """Every static scorer by key, plus the random control. Rank-based ones need `ranks`."""
    scorers: list[FfnScorer] = [LogProbIncrease(), LogProbability(), ProbIncrease(), Norm(), Coefficient(),
                                CoefficientTimesNorm(), RandomControl(seed)]
    if ranks is not None:
        scorers += [Rank(ranks), CoefficientTimesRank(ranks)]
    return {s.key: s for s in scorers}
