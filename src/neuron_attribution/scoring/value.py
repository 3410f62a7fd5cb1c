"""Value-neuron scores: the log-probability increase of docs/method.md §2, computed exactly and fast.

Imp(c·u | x) = log p(w | x + c·u) − log p(w | x). With the final norm linearised, logits are linear in the
added vector, so Imp = c·δ_w − log Σ_v p_v(x)·exp(c·δ_v) with δ = δ(u). That function of c is concave, so it
lies below its tangent at 0: Imp ≤ c·(δ_w − p(x)·δ) = c·(u·k_x), where k_x is one d-vector per base. The top-k
is found exactly by scoring neurons in descending order of that bound until the k-th best exact score is at
least the next bound. Everything here is float32 math on a trace; nothing touches the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..neurons import ExpertIndex, FfnIndex, HeadIndex, NeuronIndex
from ..model.weights import LayerStack
from .context import ValueContext
from .exact import Rows, Scored, score_rows
from . import progress
from .topk import BlockBounds, TopK, TopKSearch, exact_top_k, rank_by_score, top_indices


def layer_scores(ctx: ValueContext) -> tuple[Tensor, Tensor]:
    """(attention, ffn) per layer: the whole sublayer output added to its base. In a sequential block
    consecutive bases differ by exactly that output, so these are differences of the bases' target
    log-probabilities; in a parallel block both outputs are added to h^{l-1} and scored as rows."""
    return _per_layer(ctx, ctx.target_log_probs, lambda scored: scored.scores)


def layer_direct_parts(ctx: ValueContext) -> tuple[Tensor, Tensor]:
    """(attention, ffn) per layer: each layer score's direct part, the change of the target's logit (differences
    of the bases' target logits in a sequential block)."""
    return _per_layer(ctx, ctx.base_target_logits, lambda scored: scored.direct)


def _per_layer(ctx: ValueContext, per_state: Tensor, part) -> tuple[Tensor, Tensor]:
    if ctx.shape.parallel:
        layers = torch.arange(ctx.shape.n_layers, device=ctx.device)
        attention, ffn = score_rows(ctx, [Rows(2 * layers, ctx.trace.attention_outputs[:, -1]),
                                          Rows(2 * layers + 1, ctx.trace.ffn_outputs[:, -1])])
        return part(attention), part(ffn)
    steps = per_state[: ctx.final_state + 1].diff()  # (2L,)
    return steps[0::2].clone(), steps[1::2].clone()


def head_outputs(ctx: ValueContext, layer: int, head: int | None, weights: Tensor) -> Tensor:
    """(K, d) vectors Σ_n weights[k, n]·(output vector (head, n) of `layer`) for (K, d_h) weights; with head
    None, Σ_{j,n} weights[k, j, n]·(output vector (j, n)) for (K, H, d_h) weights. Read where the weights live."""
    if head is None:
        return ctx.output_weights.combine(layer, weights.reshape(len(weights), -1))
    first = ctx.shape.head_column(head, 0)
    rows = torch.arange(first, first + ctx.shape.head_dim, device=ctx.device)
    return weights @ ctx.output_weights.layers[layer].rows(rows)


def head_rows(ctx: ValueContext) -> Rows:
    """Every head's last-position output, each added to its layer's input; rows in (layer, head) order."""
    s = ctx.shape
    eye = torch.eye(s.n_heads, device=ctx.device).unsqueeze(-1)  # head j's output weighs only its own vectors
    summed = ctx.attention_coefficients.summed  # (L, H, d_h)
    per_head = torch.stack([head_outputs(ctx, l, None, eye * summed[l].unsqueeze(0))
                            for l in range(s.n_layers)])  # (L, H, d)
    return Rows(torch.arange(s.n_layers, device=ctx.device).repeat_interleave(s.n_heads) * 2,
                per_head.reshape(-1, s.d_model))


def head_scores(ctx: ValueContext) -> Tensor:
    """(L, H): each head's last-position output, added to the layer's input."""
    (scored,) = score_rows(ctx, [head_rows(ctx)])
    return scored.scores.reshape(ctx.shape.n_layers, ctx.shape.n_heads)


def head_position_rows(ctx: ValueContext, heads: list[tuple[int, int]], start: int = 0, stop: int | None = None
                       ) -> Rows:
    """For each (layer, head), its output coming from each source position; rows in (head, position) order, the
    ones from `start` to `stop` of them (a long prompt's are scored a round at a time)."""
    n_tokens, d = ctx.trace.n_tokens, ctx.shape.d_model
    stop = len(heads) * n_tokens if stop is None else min(stop, len(heads) * n_tokens)
    coefficients = ctx.attention_coefficients
    pieces = []
    for row in range(start // n_tokens, -(-stop // n_tokens)):
        layer, head = heads[row]
        first, last = max(start - row * n_tokens, 0), min(stop - row * n_tokens, n_tokens)
        pieces.append(head_outputs(ctx, layer, head, coefficients.of_head(layer, head)[first:last]))
    if not pieces:
        return Rows(torch.empty(0, dtype=torch.long, device=ctx.device), torch.empty(0, d, device=ctx.device))
    bases = torch.tensor([2 * layer for layer, _ in heads], device=ctx.device).repeat_interleave(n_tokens)[start:stop]
    return Rows(bases, torch.cat(pieces))


# --- neuron sets: bounds and exact evaluation -------------------------------------------------------------

def ffn_coefficients(ctx: ValueContext) -> Tensor:
    return ctx.ffn_coefficients  # (L, N)


def ffn_bounds(ctx: ValueContext) -> Tensor:
    """(L, N) upper bounds of the FFN neurons' scores."""
    if ctx.readout.softcap is not None:
        return ffn_coefficients(ctx).abs() * soft_capped_reach(ctx, ctx.ffn_values)
    slopes = ctx.ffn_values.dots(ctx.bound_directions[1::2], active_ffn_rows(ctx))
    return ffn_coefficients(ctx) * slopes


def active_ffn_rows(ctx: ValueContext) -> Tensor | None:
    """In a mixture of experts, the rows with a coefficient (the chosen experts'): only those are read."""
    return ffn_coefficients(ctx) != 0 if ctx.shape.n_experts else None


def attention_bounds(ctx: ValueContext) -> Tensor:
    """(L, H, d_h, T) upper bounds of the attention neurons' scores."""
    factors, absolute = _attention_bound_factors(ctx)
    return ctx.attention_coefficients.times(factors, absolute=absolute)


# Past this many bytes of bounds (4 per attention neuron), the search holds each block of POSITION_BLOCK source
# positions' largest bound and makes the neurons' own bounds only for the blocks it reaches: at 32k tokens on the
# default model the bounds whole would be 2.3 GB.
DENSE_ATTENTION_BOUNDS_BYTES = 64 * 2**20
POSITION_BLOCK = 256


def attention_bound_search(ctx: ValueContext, k: int) -> Tensor | BlockBounds:
    """The attention neurons' bounds as a top-`k` search reads them: whole for a short prompt, or a k so large
    that the search would reach most blocks anyway; by blocks of source positions otherwise (the same search
    result either way)."""
    coefficients = ctx.attention_coefficients
    n_neurons = math.prod(coefficients.shape)
    if 4 * n_neurons <= DENSE_ATTENTION_BOUNDS_BYTES or k >= n_neurons // POSITION_BLOCK:
        return attention_bounds(ctx)
    factors, absolute = _attention_bound_factors(ctx)
    return BlockBounds(coefficients.block_maxima(factors, POSITION_BLOCK, absolute), coefficients.shape[-1],
                       POSITION_BLOCK, lambda flat: coefficients.bounds_at(flat, factors, absolute))


def _attention_bound_factors(ctx: ValueContext) -> tuple[Tensor, bool]:
    """(L, H, d_h) factors of the attention neurons' bounds, coefficient · factor, and whether the coefficient is
    taken absolute (under soft-capped logits, where the bound is a reach, not a tangent)."""
    shape = ctx.attention_coefficients.shape[:3]
    if ctx.readout.softcap is not None:
        return soft_capped_reach(ctx, ctx.output_weights).reshape(shape), True
    return ctx.output_weights.dots(ctx.bound_directions[0::2]).reshape(shape), False


def soft_capped_reach(ctx: ValueContext, vectors: LayerStack) -> Tensor:
    """(L, R): a proved bound on |Imp(u | x)| / |c| under soft-capped logits, where the tangent bound does not
    hold: tanh is 1-Lipschitz, so no capped logit moves more than max_v |δ_v(u)| ≤ ‖normalise(u)‖·max_v ‖U_v‖,
    and the target's log-probability moves at most twice that (its own logit, and the log-sum-exp)."""
    reach = torch.cat([ctx.readout.max_logit_change(block) for _, block in vectors.chunks()])
    return 2 * reach.reshape(vectors.n_layers, vectors.n_rows)


def ffn_rows(ctx: ValueContext, flat: Tensor, keep_projection: int = 0) -> Rows:
    """FFN neurons by flat index layer·N + neuron, each added to its layer's post-attention residual."""
    layers, neurons = ctx.shape.ffn_unflat(flat)
    return Rows(2 * layers + 1, ctx.ffn_values.rows(layers, neurons), ffn_coefficients(ctx)[layers, neurons],
                keep_projection, keys=flat)


def attention_rows(ctx: ValueContext, flat: Tensor, keep_projection: int = 0) -> Rows:
    """Attention neurons by flat index into (L, H, d_h, T), each added to its layer's input. Their projection
    keys follow the FFN neurons' (a vector depends on (layer, head, dim), not on the source position)."""
    layer, head, dim, position = ctx.shape.attention_unflat(flat, ctx.trace.n_tokens)
    columns = ctx.shape.head_column(head, dim)
    return Rows(2 * layer, ctx.output_weights.rows(layer, columns),
                ctx.attention_coefficients[layer, head, dim, position], keep_projection,
                keys=ctx.shape.output_vector_key(layer, columns))


def evaluate_ffn(ctx: ValueContext, flat: Tensor) -> Tensor:
    (scored,) = score_rows(ctx, [ffn_rows(ctx, flat)])
    return scored.scores


def evaluate_attention(ctx: ValueContext, flat: Tensor) -> Tensor:
    (scored,) = score_rows(ctx, [attention_rows(ctx, flat)])
    return scored.scores


def chosen_states(neurons: list[NeuronIndex]) -> list[int]:
    """The base states the given neurons are scored from (see `chosen_rows`)."""
    return [2 * n.layer + int(isinstance(n, (FfnIndex, ExpertIndex))) for n in neurons]


def chosen_rows(ctx: ValueContext, neurons: list[NeuronIndex]) -> tuple[Rows, Tensor]:
    """Rows for the given neurons, in the order given, and their coefficients (NaN for heads, whose output has
    no single coefficient). An attention neuron without a position stands for its output from every source
    position; a head, for its whole last-position output; a whole expert, for the sum of its neurons' vectors at
    the last position (zero where the router did not choose it)."""
    s, n_tokens = ctx.shape, ctx.trace.n_tokens
    bases = torch.empty(len(neurons), dtype=torch.long, device=ctx.device)
    vectors = torch.empty(len(neurons), s.d_model, device=ctx.device)
    coefficients = torch.full((len(neurons),), float("nan"), device=ctx.device)
    for row, index in enumerate(neurons):
        s.check(index)
        bases[row] = chosen_states([index])[0]
        if isinstance(index, FfnIndex):
            vectors[row] = ctx.ffn_values.layers[index.layer].row(s.ffn_row(index))
            coefficients[row] = ffn_coefficients(ctx)[index.layer, s.ffn_row(index)]
            continue
        if isinstance(index, ExpertIndex):
            rows = s.expert_row_range(index.expert)
            weights = ffn_coefficients(ctx)[index.layer, rows.start: rows.stop]
            vectors[row] = ctx.ffn_values.layers[index.layer].part(rows).transposed_times(weights.unsqueeze(0))[0]
            continue
        layer, head = index.layer, index.head
        if isinstance(index, HeadIndex):
            summed = ctx.attention_coefficients.summed[layer, head]
            vectors[row] = head_outputs(ctx, layer, head, summed.unsqueeze(0))[0]
            continue
        if index.position is not None and index.position >= n_tokens:
            raise UserError(f"attention neuron {index} reads position {index.position}, but the prompt has "
                            f"{n_tokens} tokens (positions 0 to {n_tokens - 1})")
        per_position = ctx.attention_coefficients[layer, head, index.dim]
        vectors[row] = ctx.output_weights.layers[layer].row(s.head_column(head, index.dim))
        coefficients[row] = per_position.sum() if index.position is None else per_position[index.position]
    scale = torch.where(coefficients.isnan(), 1.0, coefficients)
    return Rows(bases, vectors, scale), coefficients


def top_ffn(ctx: ValueContext, k: int) -> TopK:
    """The exact top-k FFN value neurons (scores only, no vocabulary projection)."""
    return exact_top_k(ffn_bounds(ctx), lambda flat: (evaluate_ffn(ctx, flat), None), k)


def top_attention(ctx: ValueContext, k: int) -> TopK:
    """The exact top-k attention value neurons, flat indices into (L, H, d_h, T)."""
    return exact_top_k(attention_bound_search(ctx, k), lambda flat: (evaluate_attention(ctx, flat), None), k)


# --- ranking by the direct part -----------------------------------------------------------------------------

def ffn_direct_parts(ctx: ValueContext) -> Tensor:
    """(L, N): every FFN neuron's direct part, the change of the target's logit (docs/method.md §2)."""
    slopes = ctx.ffn_values.dots(_target_pullback(ctx).expand(ctx.shape.n_layers, -1), active_ffn_rows(ctx))
    layers = torch.arange(ctx.shape.n_layers, device=ctx.device)
    return _capped_change(ctx, ffn_coefficients(ctx) * slopes, 2 * layers + 1)


def attention_direct_parts(ctx: ValueContext) -> Tensor:
    """(L, H, d_h, T): every attention neuron's direct part."""
    slopes = ctx.output_weights.dots(_target_pullback(ctx).expand(ctx.shape.n_layers, -1))
    changes = ctx.attention_coefficients.times(slopes.reshape(ctx.attention_coefficients.shape[:3]))
    return _capped_change(ctx, changes, 2 * torch.arange(ctx.shape.n_layers, device=ctx.device))


def _target_pullback(ctx: ValueContext) -> Tensor:
    """(d,): g with u·g = δ_w(u), the change of the target's (uncapped) logit per unit of an added vector."""
    return ctx.readout.pullback(ctx.readout.unembedding.row(ctx.target).unsqueeze(0))


def _capped_change(ctx: ValueContext, changes: Tensor, states: Tensor) -> Tensor:
    """Uncapped changes of the target's logit, (L, ...) from the given base state of each layer, made into changes
    of the capped logit where the model soft-caps (then they depend on the base, not only on the vector)."""
    if ctx.readout.softcap is None:
        return changes
    base = ctx.uncapped_base_target_logits[states].reshape(-1, *[1] * (changes.dim() - 1))
    return ctx.readout.capped(base + changes) - ctx.readout.capped(base)


@dataclass
class ValueScores:
    heads: Tensor  # (L, H)
    position_heads: list[tuple[int, int]]  # the top heads, best first
    positions: Tensor  # (len(position_heads), T)
    ffn: TopK  # extra: "projection" ids, "direct" parts, "target_push_rank"
    attention: TopK  # the same
    head_direct: Tensor | None = None  # (L, H): each head's direct part


def _details(scored: Scored) -> dict[str, Tensor]:
    """What a returned neuron shows besides its score."""
    details = {"direct": scored.direct, "projection": scored.projection, "target_push_rank": scored.target_push_rank}
    return {name: values for name, values in details.items() if values is not None}


def value_scores(ctx: ValueContext, k: int, n_position_heads: int, projection: int, rank_by: str = "score"
                 ) -> ValueScores:
    """Every head's score, position scores inside the top heads, and the exact top-k FFN and attention value
    neurons, with all the exact scoring of a round in shared vocabulary-sized products. `rank_by="direct"`:
    the neurons with the largest direct parts instead (docs/method.md §2), found exactly from every neuron's
    direct part, which costs one d-sized product per neuron."""
    # Round one: every head (the bases, which the bounds need, ride along in its product). Round two: the head
    # positions inside the top heads with the first candidates of both searches; then more candidates until
    # both searches are settled. No product is left with only a few dozen rows.
    (heads,) = score_rows(ctx, [head_rows(ctx)], reported=False)
    head_scores_ = heads.scores.reshape(ctx.shape.n_layers, ctx.shape.n_heads)
    head_direct = heads.direct.reshape(ctx.shape.n_layers, ctx.shape.n_heads)
    position_heads = ctx.shape.head_indices(rank_by_score(head_scores_.reshape(-1))[:n_position_heads])
    if rank_by == "direct" and ctx.contrast is None:
        ffn: TopKSearch | _Chosen = _Chosen(ffn_direct_parts(ctx), k)
        attention: TopKSearch | _Chosen = _Chosen(attention_direct_parts(ctx), k)
    else:
        ffn, attention = TopKSearch(ffn_bounds(ctx), k), TopKSearch(attention_bound_search(ctx, k), k)
    # A long prompt's head positions are many (5·T rows): they are scored ROUND_ROWS at a time, alongside the
    # searches' candidates, so their vectors are never held all at once.
    n_position_rows = len(position_heads) * ctx.trace.n_tokens
    position_scores: list[Tensor] = []
    done = 0
    while True:
        ffn_chunk, attention_chunk = ffn.pending(), attention.pending()
        planned = done + sum(len(c) for c in (ffn_chunk, attention_chunk) if c is not None)
        # Every neuron, or a very large k, is scored a round of at most ROUND_ROWS at a time: memory stays
        # bounded by the budget's products, and progress is reported from the first round.
        ffn_chunk, attention_chunk = _capped(ffn_chunk, attention_chunk, ROUND_ROWS)
        scored_positions = sum(len(p) for p in position_scores)
        groups = []
        if scored_positions < n_position_rows:
            groups.append(head_position_rows(ctx, position_heads, scored_positions, scored_positions + ROUND_ROWS))
        if ffn_chunk is not None:
            groups.append(ffn_rows(ctx, ffn_chunk, projection))
        if attention_chunk is not None:
            groups.append(attention_rows(ctx, attention_chunk, projection))
        if not groups:
            break
        if planned >= progress.REPORTED_FROM_ROWS:
            progress.report(f"scoring {planned:,} neurons exactly", done, planned)
        scored = score_rows(ctx, groups, reported=False)
        done += sum(len(c) for c in (ffn_chunk, attention_chunk) if c is not None)
        if planned >= progress.REPORTED_FROM_ROWS:
            progress.report(f"scoring {planned:,} neurons exactly", done, planned)
        if scored_positions < n_position_rows:
            position_scores.append(scored[0].scores)
            scored = scored[1:]
        if ffn_chunk is not None:
            ffn.record(ffn_chunk, scored[0].scores, _details(scored[0]))
            scored = scored[1:]
        if attention_chunk is not None:
            attention.record(attention_chunk, scored[0].scores, _details(scored[0]))
    positions = torch.cat(position_scores) if position_scores else torch.empty(0, device=ctx.device)
    positions = positions.reshape(len(position_heads), ctx.trace.n_tokens)
    return ValueScores(head_scores_, position_heads, positions, ffn.result(), attention.result(), head_direct)


# Most neurons scored in one round of a search: (rows, d) vectors and their (rows, 2k) projections at a time.
ROUND_ROWS = 2048


def _capped(first: Tensor | None, second: Tensor | None, most: int) -> tuple[Tensor | None, Tensor | None]:
    """The two searches' pending chunks cut to at most `most` rows together, the first's first; a search whose
    chunk is cut keeps the rest pending (it records only what was scored)."""
    if first is not None and len(first) >= most:
        return first[:most], None
    left = most - (0 if first is None else len(first))
    return first, None if second is None else second[:left]


class _Chosen:
    """The `TopKSearch` protocol for neurons chosen in advance by a key (their direct parts): they are scored in
    as many rounds as the caller takes, and the result keeps their order by that key."""

    def __init__(self, keys: Tensor, k: int):
        self.chosen = top_indices(keys.reshape(-1), min(k, keys.numel()))
        self.scores: list[Tensor] = []
        self.extras: dict[str, list[Tensor]] = {}
        self.position = 0

    def pending(self) -> Tensor | None:
        return self.chosen[self.position:] if self.position < self.chosen.numel() else None

    def record(self, chunk: Tensor, scores: Tensor, extra: dict[str, Tensor] | None = None) -> None:
        self.position += chunk.numel()
        self.scores.append(scores)
        for name, values in (extra or {}).items():
            self.extras.setdefault(name, []).append(values)

    def result(self) -> TopK:
        if not self.scores:
            return TopK(self.chosen, torch.empty(0, device=self.chosen.device), 0, None)
        extra = {name: torch.cat(parts) for name, parts in self.extras.items()}
        return TopK(self.chosen[: self.position], torch.cat(self.scores), self.position, extra or None)


def dense_ffn_scores(ctx: ValueContext) -> Tensor:
    """(L, N): every FFN neuron scored exactly."""
    total = ctx.shape.n_layers * ctx.shape.d_ffn
    return evaluate_ffn(ctx, torch.arange(total, device=ctx.device)).reshape(ctx.shape.n_layers, ctx.shape.d_ffn)


def dense_attention_scores(ctx: ValueContext) -> Tensor:
    """(L, H, d_h, T): every attention neuron scored exactly."""
    s = ctx.shape
    total = s.n_layers * s.n_heads * s.head_dim * ctx.trace.n_tokens
    scores = evaluate_attention(ctx, torch.arange(total, device=ctx.device))
    return scores.reshape(s.n_layers, s.n_heads, s.head_dim, -1)
