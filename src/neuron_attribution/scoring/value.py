"""Value-neuron scores: the log-probability increase of METHOD.md §2, computed exactly and fast.

Imp(c·u | x) = log p(w | x + c·u) − log p(w | x). With the final norm linearised, logits are linear in the
added vector, so Imp = c·δ_w − log Σ_v p_v(x)·exp(c·δ_v) with δ = δ(u). That function of c is concave, so it
lies below its tangent at 0: Imp ≤ c·(δ_w − p(x)·δ) = c·(u·k_x), where k_x is one d-vector per base. The top-k
is found exactly by scoring neurons in descending order of that bound until the k-th best exact score is at
least the next bound. Everything here is float32 math on a trace; nothing touches the model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..models import ModelShape
from ..readout import LinearReadout
from ..trace import Trace

EXACT_BATCH = 256  # candidates per vocabulary-sized product: (256, V) float32 is 50 MB for V = 49k
# Rounding lets an exact score exceed its analytic bound by ~1e-7; stop only when clear of that.
_BOUND_SLACK = 1e-6
# Below this bound on |c·δ_v| the log-sum-exp can skip its max pass (float32 exp is finite and normal there).
_SAFE_EXPONENT = 80.0


@dataclass
class ValueContext:
    """The bases of every layer for one prompt and target: state 2l is h_T^{l-1}, state 2l+1 is
    h_T^{l-1}+A_T^l, state 2L is h_T^L."""

    trace: Trace
    ffn_values: Tensor  # (L, N, d)
    output_weights: Tensor  # (L, H, d_h, d)
    shape: ModelShape
    readout: LinearReadout
    target: int
    normalised_states: Tensor  # (2L+1, d): the readout's linear part applied to each state
    base_log_probs: Tensor  # (2L+1, V): log softmax of each state's logits
    base_log_sum_exp: Tensor  # (2L+1,): log-sum-exp of each state's logits
    bound_directions: Tensor  # (2L, d): k for each base

    @classmethod
    def build(cls, trace: Trace, ffn_values: Tensor, output_weights: Tensor, shape: ModelShape,
              readout: LinearReadout, target: int) -> ValueContext:
        before = trace.layer_inputs[:, -1]  # (L, d)
        middle = before + trace.attention_outputs[:, -1]
        states = torch.stack([before, middle], dim=1).reshape(-1, before.shape[-1])
        states = torch.cat([states, trace.final_residual[-1:]], dim=0)
        normalised = readout.normalise(states)
        logits = readout.logits_of_normalised(normalised)
        log_sum_exp = torch.logsumexp(logits, dim=-1)
        log_probs = logits - log_sum_exp.unsqueeze(-1)
        unembedding = readout.unembedding
        expected_row = log_probs[:-1].exp() @ unembedding  # (2L, d): p(x)·U
        directions = readout.pullback(unembedding[target] - expected_row)
        return cls(trace, ffn_values, output_weights, shape, readout, target, normalised, log_probs,
                   log_sum_exp, directions)

    @cached_property
    def target_log_probs(self) -> Tensor:
        return self.base_log_probs[:, self.target].clone()

    @cached_property
    def weighted_values(self) -> Tensor:
        """(L, H, T, d_h): α_{T,j,p}·v_{p,kv(j),n}, the coefficient of every attention neuron."""
        values = self.trace.value_states.repeat_interleave(self.shape.heads_per_kv_head, dim=2)  # (L, T, H, d_h)
        return self.trace.attention_weights.unsqueeze(-1) * values.permute(0, 2, 1, 3)

    @cached_property
    def attention_coefficients(self) -> Tensor:
        """(L, H, d_h, T): the same coefficients, indexed (layer, head, dim, source position)."""
        return self.weighted_values.permute(0, 1, 3, 2)


# --- exact scores ------------------------------------------------------------------------------------------

def exact_scores(ctx: ValueContext, bases: Tensor, vectors: Tensor, coefficients: Tensor | None = None,
                 keep_projection: int = 0) -> tuple[Tensor, Tensor | None]:
    """Imp(c·u | state_b) for rows (b, u, c), one full-vocabulary log-softmax per row, in batches.

    The logits of state_b + c·u come out of one fused product (the readout is linear), so no vocabulary-sized
    base has to be gathered per row. With keep_projection = k > 0 also returns the ids of the k highest and
    k lowest entries of δ(u) per row ((n, 2k): top then bottom), the vector's vocabulary projection."""
    n = vectors.shape[0]
    scores = torch.empty(n)
    projection = torch.empty(n, 2 * keep_projection, dtype=torch.long) if keep_projection else None
    readout = ctx.readout
    with _flushing_denormals():
        for start in range(0, n, EXACT_BATCH):
            rows = slice(start, start + EXACT_BATCH)
            scaled = vectors[rows] if coefficients is None else vectors[rows] * coefficients[rows].unsqueeze(-1)
            if keep_projection:
                # δ itself is needed for the projection, so the base is added to it rather than fused.
                delta = readout.deltas(scaled)
                projection[rows] = _signed_extremes(delta, keep_projection, coefficients, rows)
                logits = delta.add_(ctx.base_log_probs[bases[rows]])  # log p(x) + c·δ
                shift = torch.zeros(delta.shape[0])
            else:
                moved = ctx.normalised_states[bases[rows]] + readout.normalise(scaled)
                logits = readout.logits_of_normalised(moved)  # z(x) + c·δ
                shift = ctx.base_log_sum_exp[bases[rows]]
            target_logit = logits[:, ctx.target].clone()
            reach = readout.max_logit_change(scaled)
            log_sum_exp = _logsumexp_shifted(logits, shift) if bool((reach < _SAFE_EXPONENT).all()) \
                else _logsumexp_inplace(logits)
            scores[rows] = target_logit - log_sum_exp - ctx.target_log_probs[bases[rows]]
    return scores, projection


def _logsumexp_inplace(x: Tensor) -> Tensor:
    """Row-wise log-sum-exp that overwrites x (saves a vocabulary-sized allocation per batch)."""
    peak = x.amax(dim=-1, keepdim=True)
    return x.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def _logsumexp_shifted(x: Tensor, shift: Tensor) -> Tensor:
    """Row-wise log-sum-exp of x = (log-softmax of a base, shifted by `shift`) + c·δ, overwriting x.

    exp(x − shift) = p_v·exp(c·δ_v) with Σ p_v = 1, so when every |c·δ_v| < _SAFE_EXPONENT the sum lies in
    [e^−80, e^80]: no overflow, no underflow, and the max-finding pass of the general method is not needed."""
    if bool((shift != 0).any()):
        x.sub_(shift.unsqueeze(-1))
    return x.exp_().sum(dim=-1).log_().add_(shift)


def _signed_extremes(scaled_delta: Tensor, k: int, coefficients: Tensor | None, rows: slice) -> Tensor:
    """Top-k then bottom-k ids of δ(u), read from c·δ(u) (whose order flips where c < 0)."""
    top = scaled_delta.topk(k, dim=-1).indices
    bottom = scaled_delta.topk(k, dim=-1, largest=False).indices
    if coefficients is None:
        return torch.cat([top, bottom], dim=-1)
    negative = (coefficients[rows] < 0).unsqueeze(-1)
    return torch.cat([torch.where(negative, bottom, top), torch.where(negative, top, bottom)], dim=-1)


@contextmanager
def _flushing_denormals():
    """exp() of log-probabilities below about −87 gives float32 denormals, which are very slow on CPUs and
    contribute nothing at this precision."""
    previous = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not previous:
            torch.set_flush_denormal(False)


def layer_scores(ctx: ValueContext) -> tuple[Tensor, Tensor]:
    """(attention, ffn) per layer: the whole sublayer output added to its base. Consecutive bases differ by
    exactly that output, so these are differences of the bases' target log-probabilities."""
    steps = ctx.target_log_probs.diff()  # (2L,)
    return steps[0::2].clone(), steps[1::2].clone()


def head_scores(ctx: ValueContext) -> Tensor:
    """(L, H): each head's last-position output, added to the layer's input."""
    per_head = torch.einsum("lhtn,lhnd->lhd", ctx.weighted_values, ctx.output_weights)
    layers, heads, d = per_head.shape
    bases = torch.arange(layers).repeat_interleave(heads) * 2
    scores, _ = exact_scores(ctx, bases, per_head.reshape(-1, d))
    return scores.reshape(layers, heads)


def head_position_scores(ctx: ValueContext, heads: list[tuple[int, int]]) -> Tensor:
    """(len(heads), T): the output of one head coming from one source position."""
    if not heads:
        return torch.empty(0, ctx.trace.n_tokens)
    vectors = torch.stack([ctx.weighted_values[l, j] @ ctx.output_weights[l, j] for l, j in heads])  # (K, T, d)
    bases = torch.tensor([2 * l for l, _ in heads]).repeat_interleave(vectors.shape[1])
    scores, _ = exact_scores(ctx, bases, vectors.reshape(-1, vectors.shape[-1]))
    return scores.reshape(len(heads), -1)


# --- neuron sets: bounds and exact evaluation -------------------------------------------------------------

def ffn_coefficients(ctx: ValueContext) -> Tensor:
    return ctx.trace.ffn_coefficients[:, -1]  # (L, N)


def ffn_bounds(ctx: ValueContext) -> Tensor:
    """(L, N) upper bounds of the FFN neurons' scores."""
    slopes = torch.einsum("lnd,ld->ln", ctx.ffn_values, ctx.bound_directions[1::2])
    return ffn_coefficients(ctx) * slopes


def attention_bounds(ctx: ValueContext) -> Tensor:
    """(L, H, d_h, T) upper bounds of the attention neurons' scores."""
    slopes = torch.einsum("lhnd,ld->lhn", ctx.output_weights, ctx.bound_directions[0::2])
    return ctx.attention_coefficients * slopes.unsqueeze(-1)


def evaluate_ffn(ctx: ValueContext, flat: Tensor, keep_projection: int = 0):
    n_ffn = ctx.shape.d_ffn
    layers, neurons = flat // n_ffn, flat % n_ffn
    vectors = ctx.ffn_values[layers, neurons]
    coefficients = ffn_coefficients(ctx)[layers, neurons]
    return exact_scores(ctx, 2 * layers + 1, vectors, coefficients, keep_projection)


def evaluate_attention(ctx: ValueContext, flat: Tensor):
    layer, head, dim, position = torch.unravel_index(flat, ctx.attention_coefficients.shape)
    vectors = ctx.output_weights[layer, head, dim]
    coefficients = ctx.attention_coefficients[layer, head, dim, position]
    return exact_scores(ctx, 2 * layer, vectors, coefficients)[0]


@dataclass
class TopK:
    indices: Tensor  # flat indices into the neuron set, best first
    scores: Tensor
    n_evaluated: int  # how many neurons were scored exactly
    extra: Tensor | None = None  # per returned neuron, whatever the evaluator kept (vocabulary ids)


def exact_top_k(bounds: Tensor, evaluate: Callable[[Tensor], tuple[Tensor, Tensor | None]], k: int) -> TopK:
    """The k highest scores, given an upper bound per item and an exact evaluator, evaluating in bound order
    until no unevaluated item can enter. Ties in score go to the lower index."""
    flat_bounds = bounds.reshape(-1)
    total = flat_bounds.numel()
    k = min(k, total)
    done: list[Tensor] = []
    scored: list[Tensor] = []
    extras: list[Tensor] = []
    # The bound is tight for all but the largest contributions, so a little over k usually settles it.
    position, batch = 0, k + max(k // 8, 16)
    while position < total:
        # Only the next stretch of the bound order is needed: a partial sort, not a sort of every neuron.
        reach = min(total, position + 2 * batch)
        order = flat_bounds.topk(reach).indices
        chunk = order[position: position + batch]
        scores, extra = evaluate(chunk)
        done.append(chunk)
        scored.append(scores)
        if extra is not None:
            extras.append(extra)
        position += chunk.numel()
        if position >= k:
            kth = torch.cat(scored).topk(k).values[-1]
            if position >= total or kth >= flat_bounds[order[position]] + _BOUND_SLACK:
                break
        batch = max(k // 4, 32)
    indices, scores = torch.cat(done), torch.cat(scored)
    ranking = rank_by_score(scores, indices)[:k]
    return TopK(indices[ranking], scores[ranking], position,
                torch.cat(extras)[ranking] if extras else None)


def rank_by_score(scores: Tensor, indices: Tensor) -> Tensor:
    """Positions sorted by descending score, ties to the lower index."""
    by_index = torch.argsort(indices, stable=True)
    return by_index[torch.argsort(scores[by_index], descending=True, stable=True)]


def dense_ffn_scores(ctx: ValueContext) -> Tensor:
    """(L, N): every FFN neuron scored exactly."""
    total = ctx.shape.n_layers * ctx.shape.d_ffn
    return evaluate_ffn(ctx, torch.arange(total))[0].reshape(ctx.shape.n_layers, ctx.shape.d_ffn)


def dense_attention_scores(ctx: ValueContext) -> Tensor:
    """(L, H, d_h, T): every attention neuron scored exactly."""
    s = ctx.shape
    total = s.n_layers * s.n_heads * s.head_dim * ctx.trace.n_tokens
    return evaluate_attention(ctx, torch.arange(total)).reshape(s.n_layers, s.n_heads, s.head_dim, -1)
