"""Value-neuron scores: the log-probability increase of METHOD.md §2, computed exactly and fast.

Imp(c·u | x) = log p(w | x + c·u) − log p(w | x). With the final norm linearised, logits are linear in the
added vector, so Imp = c·δ_w − log Σ_v p_v(x)·exp(c·δ_v) with δ = δ(u). That function of c is concave, so it
lies below its tangent at 0: Imp ≤ c·(δ_w − p(x)·δ) = c·(u·k_x), where k_x is one d-vector per base. The top-k
is found exactly by scoring neurons in descending order of that bound until the k-th best exact score is at
least the next bound. Everything here is float32 math on a trace; nothing touches the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..models import ModelShape
from ..readout import LinearReadout
from ..trace import Trace

EXACT_BATCH = 512  # most rows per vocabulary-sized product: (512, V) float32 is 100 MB for V = 49k
DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes the vocabulary-sized buffers of the scoring step may take
_memory_budget = DEFAULT_MEMORY_BUDGET
# Rounding lets an exact score exceed its analytic bound by ~1e-7; stop only when clear of that.
_BOUND_SLACK = 1e-6
# Below this bound on |c·δ_v| the log-sum-exp can skip its max pass (float32 exp is finite and normal there).
_SAFE_EXPONENT = 80.0


@dataclass
class ValueContext:
    """The bases of every layer for one prompt and target: state 2l is h_T^{l-1}, state 2l+1 is
    h_T^{l-1}+A_T^l, state 2L is h_T^L, and state 2L+1 is the zero vector (a neuron read alone, no context)."""

    trace: Trace
    ffn_values: Tensor  # (L, N, d)
    output_weights: Tensor  # (L, H, d_h, d)
    shape: ModelShape
    readout: LinearReadout
    target: int
    normalised_states: Tensor  # (2L+2, d): the readout's linear part applied to each state
    base_log_probs: Tensor  # (2L+2, V): log softmax of each state's logits
    base_log_sum_exp: Tensor  # (2L+2,): log-sum-exp of each state's logits
    bound_directions: Tensor  # (2L, d): k for each layer base
    alone_direction: Tensor  # (d,): k for the zero state

    @classmethod
    def build(cls, trace: Trace, ffn_values: Tensor, output_weights: Tensor, shape: ModelShape,
              readout: LinearReadout, target: int) -> ValueContext:
        before = trace.layer_inputs[:, -1]  # (L, d)
        middle = before + trace.attention_outputs[:, -1]
        states = torch.stack([before, middle], dim=1).reshape(-1, before.shape[-1])
        states = torch.cat([states, trace.final_residual[-1:], torch.zeros(1, states.shape[-1])], dim=0)
        normalised = readout.normalise(states)
        vocabulary = readout.unembedding.shape[0]
        logits = readout.logits_of_normalised(normalised, out=_scratch.buffer("logits", len(states), vocabulary))
        log_sum_exp = torch.logsumexp(logits, dim=-1)
        log_probs = logits - log_sum_exp.unsqueeze(-1)
        unembedding = readout.unembedding
        probs = torch.exp(log_probs, out=_scratch.buffer("bases", len(states), vocabulary))
        expected_row = probs @ unembedding  # p(x)·U per state
        directions = readout.pullback(unembedding[target] - expected_row)
        layer_bases = 2 * shape.n_layers
        return cls(trace, ffn_values, output_weights, shape, readout, target, normalised, log_probs,
                   log_sum_exp, directions[:layer_bases], directions[layer_bases + 1])

    @property
    def final_state(self) -> int:
        return 2 * self.shape.n_layers

    @property
    def zero_state(self) -> int:
        return 2 * self.shape.n_layers + 1

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

@dataclass
class Rows:
    """Vectors to score exactly: row i is coefficients[i]·vectors[i] added to state bases[i]. With
    projection = k > 0 the ids of the k highest and k lowest entries of δ of each row are kept too."""

    bases: Tensor  # (n,) state indices
    vectors: Tensor  # (n, d)
    coefficients: Tensor | None = None  # (n,)
    projection: int = 0

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def scaled(self) -> Tensor:
        return self.vectors if self.coefficients is None else self.vectors * self.coefficients.unsqueeze(-1)


@dataclass
class Scored:
    scores: Tensor  # (n,)
    projection: Tensor | None  # (n, 2k) ids, top then bottom (signed by the coefficient), or None


def score_rows(ctx: ValueContext, groups: list[Rows]) -> list[Scored]:
    """Imp(c·u | state_b) for every row of every group, one full-vocabulary log-softmax per row.

    All groups share the vocabulary-sized products, in batches as large as memory allows: the product runs
    markedly faster on a few hundred rows than on a few dozen. The logits of state_b + c·u come out of one fused
    product (the readout is linear), so no vocabulary-sized base has to be gathered per row."""
    if not groups:
        return []
    bases = torch.cat([g.bases for g in groups])
    scaled = torch.cat([g.scaled() for g in groups])
    signs = torch.cat([torch.ones(len(g)) if g.coefficients is None else g.coefficients.sign() for g in groups])
    keep = torch.cat([torch.full((len(g),), g.projection, dtype=torch.long) for g in groups])
    width = max(g.projection for g in groups)
    scores = torch.empty(len(bases))
    projection = torch.zeros(len(bases), 2 * width, dtype=torch.long)
    readout = ctx.readout
    vocabulary = readout.unembedding.shape[0]
    with _flushing_denormals():
        for rows in _balanced_batches(len(bases), rows_per_product(vocabulary)):
            size = rows.stop - rows.start
            moved = ctx.normalised_states[bases[rows]] + readout.normalise(scaled[rows])
            logits = readout.logits_of_normalised(moved, out=_scratch.buffer("logits", size, vocabulary))
            wanted = (keep[rows] > 0).nonzero().squeeze(-1)
            if width and wanted.numel():
                projection[rows][wanted] = _projection_ids(ctx, logits, bases[rows], wanted, width,
                                                          signs[rows][wanted])
            target_logit = logits[:, ctx.target].clone()
            reach = readout.max_logit_change(scaled[rows])
            shift = ctx.base_log_sum_exp[bases[rows]]
            log_sum_exp = _logsumexp_shifted(logits, shift) if bool((reach < _SAFE_EXPONENT).all()) \
                else _logsumexp_inplace(logits)
            scores[rows] = target_logit - log_sum_exp - ctx.target_log_probs[bases[rows]]
    result, start = [], 0
    for g in groups:
        part = slice(start, start + len(g))
        result.append(Scored(scores[part], projection[part, : 2 * g.projection] if g.projection else None))
        start += len(g)
    return result


def _projection_ids(ctx: ValueContext, logits: Tensor, bases: Tensor, wanted: Tensor, k: int,
                    signs: Tensor) -> Tensor:
    """Top-k then bottom-k ids of δ(u) for the wanted rows of fused logits z(x) + c·δ. Subtracting the base's
    log-probabilities leaves c·δ plus a per-row constant, which does not change the order; where c < 0 the
    order of δ is the reverse of that of c·δ."""
    base = torch.index_select(ctx.base_log_probs, 0, bases[wanted],
                              out=_scratch.buffer("bases", wanted.numel(), logits.shape[1]))
    shifted = base.neg_().add_(logits[wanted])
    top = shifted.topk(k, dim=-1).indices
    bottom = shifted.topk(k, dim=-1, largest=False).indices
    negative = (signs < 0).unsqueeze(-1)
    return torch.cat([torch.where(negative, bottom, top), torch.where(negative, top, bottom)], dim=-1)


def set_memory_budget(max_bytes: int) -> None:
    """Bound the vocabulary-sized buffers of exact scoring (two of rows × V float32): fewer rows per product
    when the vocabulary is large or the budget small. Everything else in scoring grows with the prompt
    length only linearly and stays far below this for prompts of a few thousand tokens."""
    global _memory_budget
    if max_bytes <= 0:
        raise ValueError("the memory budget must be positive")
    _memory_budget = max_bytes


def rows_per_product(vocabulary: int) -> int:
    return max(1, min(EXACT_BATCH, _memory_budget // (2 * 4 * vocabulary)))


def _balanced_batches(n: int, most: int) -> list[slice]:
    """Consecutive slices of at most `most` rows and near-equal size: a short tail batch would run the
    vocabulary-sized product at a fraction of the speed of a full one."""
    count = max(1, -(-n // most))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _Scratch:
    """Reused vocabulary-sized buffers. A fresh 100 MB tensor per batch costs more in page faults than the
    exp() over it; these are allocated once per thread and grown when a larger batch needs it."""

    def __init__(self):
        self._local = threading.local()

    def buffer(self, name: str, rows: int, columns: int) -> Tensor:
        store = self._local.__dict__.setdefault("buffers", {})
        held = store.get(name)
        if held is None or held.shape[1] != columns or held.shape[0] < rows:
            held = store[name] = torch.empty(rows, columns)
        return held[:rows]


_scratch = _Scratch()


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
    steps = ctx.target_log_probs[: ctx.final_state + 1].diff()  # (2L,)
    return steps[0::2].clone(), steps[1::2].clone()


def head_rows(ctx: ValueContext) -> Rows:
    """Every head's last-position output, each added to its layer's input; rows in (layer, head) order."""
    per_head = torch.einsum("lhtn,lhnd->lhd", ctx.weighted_values, ctx.output_weights)
    layers, heads, d = per_head.shape
    return Rows(torch.arange(layers).repeat_interleave(heads) * 2, per_head.reshape(-1, d))


def head_scores(ctx: ValueContext) -> Tensor:
    """(L, H): each head's last-position output, added to the layer's input."""
    (scored,) = score_rows(ctx, [head_rows(ctx)])
    return scored.scores.reshape(ctx.shape.n_layers, ctx.shape.n_heads)


def head_position_rows(ctx: ValueContext, heads: list[tuple[int, int]]) -> Rows:
    """For each (layer, head), its output coming from each source position; rows in (head, position) order."""
    n_tokens, d = ctx.trace.n_tokens, ctx.shape.d_model
    if not heads:
        return Rows(torch.empty(0, dtype=torch.long), torch.empty(0, d))
    vectors = torch.stack([ctx.weighted_values[l, j] @ ctx.output_weights[l, j] for l, j in heads])  # (K, T, d)
    bases = torch.tensor([2 * l for l, _ in heads]).repeat_interleave(n_tokens)
    return Rows(bases, vectors.reshape(-1, d))


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


def ffn_rows(ctx: ValueContext, flat: Tensor, keep_projection: int = 0) -> Rows:
    """FFN neurons by flat index layer·N + neuron, each added to its layer's post-attention residual."""
    layers, neurons = flat // ctx.shape.d_ffn, flat % ctx.shape.d_ffn
    return Rows(2 * layers + 1, ctx.ffn_values[layers, neurons], ffn_coefficients(ctx)[layers, neurons],
                keep_projection)


def attention_rows(ctx: ValueContext, flat: Tensor) -> Rows:
    """Attention neurons by flat index into (L, H, d_h, T), each added to its layer's input."""
    layer, head, dim, position = torch.unravel_index(flat, ctx.attention_coefficients.shape)
    return Rows(2 * layer, ctx.output_weights[layer, head, dim],
                ctx.attention_coefficients[layer, head, dim, position])


def evaluate_ffn(ctx: ValueContext, flat: Tensor, keep_projection: int = 0) -> tuple[Tensor, Tensor | None]:
    (scored,) = score_rows(ctx, [ffn_rows(ctx, flat, keep_projection)])
    return scored.scores, scored.projection


def evaluate_attention(ctx: ValueContext, flat: Tensor) -> Tensor:
    (scored,) = score_rows(ctx, [attention_rows(ctx, flat)])
    return scored.scores


@dataclass
class TopK:
    indices: Tensor  # flat indices into the neuron set, best first
    scores: Tensor
    n_evaluated: int  # how many neurons were scored exactly
    extra: Tensor | None = None  # per returned neuron, whatever the evaluator kept (vocabulary ids)


class TopKSearch:
    """The k highest scores, given an upper bound per item: items are scored exactly in descending bound
    order until the k-th best exact score is at least the next bound, so no unevaluated item can enter.

    The caller scores `pending()` however it likes (sharing products with other work) and hands the scores
    back with `record()`, until `pending()` is None. Ties in score go to the lower index."""

    def __init__(self, bounds: Tensor, k: int):
        self.bounds = bounds.reshape(-1)
        self.total = self.bounds.numel()
        self.k = min(k, self.total)
        self.position = 0
        # The bound is tight for all but the largest contributions, so a little over k usually settles it.
        self.batch = self.k + max(self.k // 8, 16)
        self.order = self.bounds.topk(min(self.total, 2 * self.batch)).indices
        self.done: list[Tensor] = []
        self.scored: list[Tensor] = []
        self.extras: list[Tensor] = []
        self.finished = self.k == 0

    def pending(self) -> Tensor | None:
        if self.finished:
            return None
        end = min(self.total, self.position + self.batch)
        if end > self.order.numel():
            # Only the next stretch of the bound order is needed: a partial sort, not a sort of every item.
            self.order = self.bounds.topk(min(self.total, self.position + 2 * self.batch)).indices
        return self.order[self.position: end]

    def record(self, chunk: Tensor, scores: Tensor, extra: Tensor | None = None) -> None:
        self.done.append(chunk)
        self.scored.append(scores)
        if extra is not None:
            self.extras.append(extra)
        self.position += chunk.numel()
        self.batch = max(self.k // 4, 32)
        if self.position >= self.total:
            self.finished = True
        elif self.position >= self.k:
            kth = torch.cat(self.scored).topk(self.k).values[-1]
            if self.position >= self.order.numel():
                self.order = self.bounds.topk(min(self.total, self.position + 1)).indices
            self.finished = bool(kth >= self.bounds[self.order[self.position]] + _BOUND_SLACK)

    def result(self) -> TopK:
        if not self.done:
            return TopK(torch.empty(0, dtype=torch.long), torch.empty(0), 0, None)
        indices, scores = torch.cat(self.done), torch.cat(self.scored)
        ranking = rank_by_score(scores, indices)[: self.k]
        return TopK(indices[ranking], scores[ranking], self.position,
                    torch.cat(self.extras)[ranking] if self.extras else None)


def exact_top_k(bounds: Tensor, evaluate: Callable[[Tensor], tuple[Tensor, Tensor | None]], k: int) -> TopK:
    """`TopKSearch` run to the end with one evaluator."""
    search = TopKSearch(bounds, k)
    while (chunk := search.pending()) is not None:
        search.record(chunk, *evaluate(chunk))
    return search.result()


def top_ffn(ctx: ValueContext, k: int) -> TopK:
    """The exact top-k FFN value neurons (scores only, no vocabulary projection)."""
    return exact_top_k(ffn_bounds(ctx), lambda flat: evaluate_ffn(ctx, flat), k)


def top_attention(ctx: ValueContext, k: int) -> TopK:
    """The exact top-k attention value neurons, flat indices into (L, H, d_h, T)."""
    return exact_top_k(attention_bounds(ctx), lambda flat: (evaluate_attention(ctx, flat), None), k)


@dataclass
class ValueScores:
    heads: Tensor  # (L, H)
    position_heads: list[tuple[int, int]]  # the top heads, best first
    positions: Tensor  # (len(position_heads), T)
    ffn: TopK  # extra: projection ids
    attention: TopK


def value_scores(ctx: ValueContext, k: int, n_position_heads: int, projection: int) -> ValueScores:
    """Every head's score, position scores inside the top heads, and the exact top-k FFN and attention value
    neurons, with all the exact scoring of a round in shared vocabulary-sized products."""
    ffn = TopKSearch(ffn_bounds(ctx), k)
    attention = TopKSearch(attention_bounds(ctx), k)
    heads = head_rows(ctx)
    extra_groups: list[Rows] = [heads]
    head_scores_, position_heads, positions = None, [], None
    while True:
        ffn_chunk, attention_chunk = ffn.pending(), attention.pending()
        groups = list(extra_groups)
        if ffn_chunk is not None:
            groups.append(ffn_rows(ctx, ffn_chunk, projection))
        if attention_chunk is not None:
            groups.append(attention_rows(ctx, attention_chunk))
        if not groups:
            break
        scored = score_rows(ctx, groups)
        extra_scored, rest = scored[: len(extra_groups)], scored[len(extra_groups):]
        if ffn_chunk is not None:
            ffn.record(ffn_chunk, rest[0].scores, rest[0].projection)
            rest = rest[1:]
        if attention_chunk is not None:
            attention.record(attention_chunk, rest[0].scores)
        extra_groups = []
        if head_scores_ is None:
            head_scores_ = extra_scored[0].scores.reshape(ctx.shape.n_layers, ctx.shape.n_heads)
            flat = rank_by_score(head_scores_.reshape(-1), torch.arange(head_scores_.numel()))
            position_heads = [divmod(int(i), ctx.shape.n_heads) for i in flat[:n_position_heads]]
            extra_groups = [head_position_rows(ctx, position_heads)]
        elif positions is None:
            positions = extra_scored[0].scores.reshape(len(position_heads), ctx.trace.n_tokens)
    return ValueScores(head_scores_, position_heads, positions, ffn.result(), attention.result())


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
