"""Exact scores of many vectors at once: one full-vocabulary log-softmax per row, in shared products."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .buffers import smallest_budget
from .context import ValueContext
from .progress import report
from .projections import SharedProjections, cached_projection_ids, direction_projections

EXACT_BATCH = 512  # most rows per vocabulary-sized product: (512, V) float32 is 100 MB for V = 49k
# A product has at least this many rows (zeros added): BLAS computes a row of a product of very few rows another
# way (a row of 1 to 11 came out different in its last bits from the same row among 12 or more, on 2 MKL threads),
# and a neuron's score must not depend on which others share its batch.
MIN_PRODUCT_ROWS = 16
# Below this bound on |c·δ_v| the log-sum-exp can skip its max pass (float32 exp is finite and normal there).
_SAFE_EXPONENT = 80.0


@dataclass
class Rows:
    """Vectors to score exactly: row i is coefficients[i]·vectors[i] added to state bases[i]. With
    projection = k > 0 the ids of the k highest and k lowest entries of δ of each row are kept too."""

    bases: Tensor  # (n,) state indices
    vectors: Tensor  # (n, d)
    coefficients: Tensor | None = None  # (n,)
    projection: int = 0
    keys: Tensor | None = None  # (n,) flat neuron indices: lets weight-only results (projections) be reused

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def scaled(self) -> Tensor:
        return self.vectors if self.coefficients is None else self.vectors * self.coefficients.unsqueeze(-1)


@dataclass
class Scored:
    scores: Tensor  # (n,)
    projection: Tensor | None  # (n, 2k) ids, top then bottom (signed by the coefficient), or None
    # The score's first part, the change of the target's own logit c·δ_w (docs/method.md §2); the second part, the
    # change of the log-normaliser, is direct − scores. With a contrast the normaliser cancels: direct = scores.
    direct: Tensor  # (n,)
    # Where the row has a projection: the target's rank among the tokens its contribution c·δ pushes, 1 = the
    # token it raises most (None with a contrast, which needs no vocabulary-sized product).
    target_push_rank: Tensor | None = None  # (n,)


def score_rows(ctx: ValueContext, groups: list[Rows], reported: bool = True) -> list[Scored]:
    """Imp(c·u | state_b) for every row of every group, one full-vocabulary log-softmax per row.

    All groups share the vocabulary-sized products, in batches as large as memory allows: the product runs
    markedly faster on a few hundred rows than on a few dozen. Neurons (rows with a key) are scored along their
    own direction: δ(u) is one product row per (neuron, base), and each row's logits are log p(x) + c·δ(u), a pass
    over the vocabulary instead of a product; an attention neuron's vector is the same at every source position
    (only its coefficient differs), so every neuron at once needs a product row per attention vector, not per
    neuron. Other rows (heads, positions, layers, chosen vectors) and every row under soft-capped logits, which are
    not linear in c, come out of one fused product, the logits of state_b + c·u (the readout is linear).
    `reported`: progress goes to the reporter (off where the caller reports a larger whole)."""
    if not groups:
        return []
    device = ctx.device
    rows = _Concatenated.of(groups, device)
    width = max(g.projection for g in groups)
    projection = torch.zeros(len(rows), 2 * width, dtype=torch.long, device=device)
    if ctx.contrast is not None:
        scores = _contrast_scores(ctx, rows.bases, rows.scaled)
        if width:
            wanted = (rows.keep > 0).nonzero().squeeze(-1)
            projection[wanted] = cached_projection_ids(ctx, rows.bases, wanted, rows.scaled, rows.signs, rows.keys,
                                                        width)
        return _split(groups, scores, projection, scores, None)
    out = _Outputs(torch.empty(len(rows), device=device), projection, torch.empty(len(rows), device=device),
                   torch.zeros(len(rows), dtype=torch.long, device=device), width)
    progress = (lambda done: report(f"scoring {len(rows):,} neurons exactly", done, len(rows))) if reported else None
    along = (rows.keys >= 0) if ctx.readout.softcap is None else torch.zeros(len(rows), dtype=torch.bool,
                                                                            device=device)
    fused = (~along).nonzero().squeeze(-1)
    along = along.nonzero().squeeze(-1)
    if len(along):  # neurons of one (base, vector) side by side, so that each batch reads their direction once
        order = rows.bases[along] * (int(rows.keys.max()) + 1) + rows.keys[along]
        along = along[torch.argsort(order, stable=True)]
    with _flushing_denormals():
        budget = ctx.memory_budget if ctx.budget_fixed else device_budget(ctx.memory_budget, device)
        most = rows_per_product(ctx.readout.unembedding.shape[0], budget)
        riders = ctx.states_to_read()
        if riders is not None and 2 * len(riders) > most:
            ctx.read_bases()  # a budget this small reads them in a product of their own
            riders = None
        _score_in_batches(ctx, rows, fused, along, riders, most, out, progress)
    return _split(groups, out.scores, projection, out.direct, out.push_rank)


@dataclass
class _Concatenated:
    """The rows of every group, one tensor per field."""

    bases: Tensor  # (n,)
    vectors: Tensor  # (n, d): u
    coefficients: Tensor  # (n,): c (1 where a group has none)
    scaled: Tensor  # (n, d): c·u
    signs: Tensor  # (n,)
    keep: Tensor  # (n,): the projection width of the row's group
    keys: Tensor  # (n,) long: the neuron's key, -1 for rows of no neuron

    @classmethod
    def of(cls, groups: list[Rows], device: torch.device) -> _Concatenated:
        coefficients = torch.cat([torch.ones(len(g), device=device) if g.coefficients is None else g.coefficients
                                  for g in groups])
        vectors = torch.cat([g.vectors for g in groups])
        return cls(torch.cat([g.bases for g in groups]), vectors, coefficients,
                   vectors * coefficients.unsqueeze(-1), coefficients.sign(),
                   torch.cat([torch.full((len(g),), g.projection, dtype=torch.long, device=device) for g in groups]),
                   torch.cat([g.keys.long() if g.keys is not None else
                              torch.full((len(g),), -1, dtype=torch.long, device=device) for g in groups]))

    def __len__(self) -> int:
        return len(self.bases)


@dataclass
class _Outputs:
    scores: Tensor
    projection: Tensor  # (n, 2·width)
    direct: Tensor
    push_rank: Tensor
    width: int


def _score_in_batches(ctx: ValueContext, rows: _Concatenated, fused: Tensor, along: Tensor, riders: Tensor | None,
                      most: int, out: _Outputs, progress) -> None:
    """The `fused` rows, then the `along` rows (sorted by (base, key)), in balanced batches of one product each:
    the bases' states riding in the first, then each fused row's state_b + c·u, then each (base, key)'s δ(u)."""
    readout, device = ctx.readout, ctx.device
    vocabulary = readout.unembedding.shape[0]
    shared = SharedProjections(out.width)
    order = torch.cat([fused, along])
    n_riders, n_fused = 0 if riders is None else len(riders), len(fused)
    batches = _balanced_batches(n_riders + len(order), most)
    products = _logits_buffer(ctx, "logits", most, batches, vocabulary, device)
    along_logits = _logits_buffer(ctx, "along", most, batches, vocabulary, device) if len(along) else None
    done = 0
    for combined in batches:
        riding = n_riders if combined.start == 0 else 0
        start, stop = combined.start + riding - n_riders, combined.stop - n_riders
        fused_part, along_part = order[start: max(start, min(stop, n_fused))], order[max(start, n_fused): stop]
        inputs = [riders] if riding else []
        inputs.append(ctx.normalised_states[rows.bases[fused_part]] + readout.normalise(rows.scaled[fused_part]))
        pair = None
        if len(along_part):
            first = torch.ones(len(along_part), dtype=torch.bool, device=device)  # a row that starts a (base, key)
            first[1:] = (rows.bases[along_part[1:]] != rows.bases[along_part[:-1]]) | \
                (rows.keys[along_part[1:]] != rows.keys[along_part[:-1]])
            pair = first.cumsum(0) - 1  # each row's (base, key) in this batch
            inputs.append(readout.normalise(rows.vectors[along_part[first]]))
        moved = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        padding = min(MIN_PRODUCT_ROWS, len(products)) - len(moved)
        if padding > 0:
            moved = torch.cat([moved, moved.new_zeros(padding, moved.shape[1])])
        product = readout.unembedding.times_transposed(moved, out=products[: len(moved)])
        logits = readout.finish_logits(product[: riding + len(fused_part)])  # δ(u) rows take no constant
        if riding:
            ctx.take_base_logits(logits[:riding])
        if len(fused_part):
            _fused_rows(ctx, rows, fused_part, logits[riding:], shared, out)
        if len(along_part):
            _rows_along_directions(ctx, rows, along_part, pair, product[riding + len(fused_part):],
                                   along_logits[: len(along_part)], out)
        done += len(fused_part) + len(along_part)
        if progress:
            progress(done)


def _fused_rows(ctx: ValueContext, rows: _Concatenated, part: Tensor, logits: Tensor, shared: SharedProjections,
                out: _Outputs) -> None:
    """Rows whose `logits` are those of state_b + c·u (overwritten)."""
    readout = ctx.readout
    bases, scaled = rows.bases[part], rows.scaled[part]
    if out.width:
        wanted = (rows.keep[part] > 0).nonzero().squeeze(-1)
        out.projection[part[wanted]], out.push_rank[part[wanted]] = shared.read(
            ctx, logits, bases, scaled, rows.signs[part], rows.keys[part], wanted)
    target_logit = logits[:, ctx.target].clone()
    out.direct[part] = target_logit - ctx.base_target_logits[bases]
    reach = readout.max_logit_change(scaled)
    shift = ctx.base_log_sum_exp[bases]
    log_sum_exp = _logsumexp_shifted(logits, shift) if bool((reach < _SAFE_EXPONENT).all()) \
        else _logsumexp_inplace(logits)
    out.scores[part] = target_logit - log_sum_exp - ctx.target_log_probs[bases]


def _rows_along_directions(ctx: ValueContext, rows: _Concatenated, part: Tensor, pair: Tensor, deltas: Tensor,
                           logits: Tensor, out: _Outputs) -> None:
    """Neuron rows sorted by (base, key), `pair[i]` the row of `deltas` that holds δ(u) of row i's (base, key):
    each row's logits log p(x) + c·δ(u) go to `logits`, and Imp = c·δ_w − log Σ_v p_v(x)·exp(c·δ_v), whose second
    term is the change of the log-normaliser. The projection and push rank are read off δ(u) itself."""
    bases, coefficients = rows.bases[part], rows.coefficients[part]
    if out.width:
        wanted = (rows.keep[part] > 0).nonzero().squeeze(-1)
        out.projection[part[wanted]], out.push_rank[part[wanted]] = direction_projections(
            ctx, deltas, pair[wanted], rows.signs[part[wanted]] < 0, out.width)
    direct = coefficients * deltas[:, ctx.target][pair]
    log_probs = ctx.base_log_probs
    for start, stop in _runs(bases):
        _add_along(log_probs[int(bases[start])], coefficients[start:stop], deltas, pair[start:stop],
                   logits[start:stop])
    reach = ctx.readout.max_logit_change(rows.scaled[part])
    # log p ≤ 0, so every entry is at most c·δ_v ≤ reach: below _SAFE_EXPONENT no max pass is needed
    log_sum_exp = _logsumexp_unshifted(logits) if bool((reach < _SAFE_EXPONENT).all()) else _logsumexp_inplace(logits)
    off = coefficients == 0  # a neuron switched off adds nothing: exactly 0, not the rounding of log Σ p_v
    out.direct[part] = torch.where(off, 0.0, direct)
    out.scores[part] = torch.where(off, 0.0, direct - log_sum_exp)


def _add_along(log_probs: Tensor, coefficients: Tensor, deltas: Tensor, pairs: Tensor, out: Tensor) -> None:
    """out[i] = log_probs + coefficients[i]·deltas[pairs[i]] for non-decreasing, consecutive `pairs`, as a product
    and a sum, each rounded on its own whatever the shapes (a fused multiply-add, which torch's broadcasting
    `addcmul` used for some shapes and not others, would make a score depend on its batch): without a gather
    where each direction has one row."""
    first, n = int(pairs[0]), len(pairs)
    if int(pairs[-1]) - first + 1 == n:
        torch.mul(deltas[first: first + n], coefficients.unsqueeze(1), out=out)
    else:
        torch.index_select(deltas, 0, pairs, out=out).mul_(coefficients.unsqueeze(1))
    out.add_(log_probs)


def _runs(values: Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal consecutive values."""
    changes = (values[1:] != values[:-1]).nonzero().squeeze(-1) + 1
    edges = [0, *changes.tolist(), len(values)]
    return list(zip(edges, edges[1:]))


def _logits_buffer(ctx: ValueContext, name: str, most: int, batches: list[slice], vocabulary: int,
                   device: torch.device) -> Tensor:
    """A kept (rows, V) buffer. On the CPU one of the budget's size for the session, never re-made at each call's
    largest batch: re-made at varying sizes it fragmented the heap (hundreds of MB of resident memory over a few
    calls), and pages a call does not write are never touched. A GPU's caching allocator has no such trouble but
    does hold what is allocated, so there the buffer is the call's largest batch."""
    rows_held = most if device.type == "cpu" else max(b.stop - b.start for b in batches)
    return ctx.caches.scratch.buffer(name, rows_held, vocabulary, device)


def _split(groups: list[Rows], scores: Tensor, projection: Tensor, direct: Tensor, push_rank: Tensor | None
           ) -> list[Scored]:
    result, start = [], 0
    for g in groups:
        part = slice(start, start + len(g))
        projected = bool(g.projection)
        result.append(Scored(scores[part], projection[part, : 2 * g.projection] if projected else None,
                             direct[part], push_rank[part] if projected and push_rank is not None else None))
        start += len(g)
    return result


def _contrast_scores(ctx: ValueContext, bases: Tensor, scaled: Tensor) -> Tensor:
    """Imp_target − Imp_contrast for every row: the change of z_target − z_contrast. The log-sum-exp cancels,
    so two logits per row are all it takes: no vocabulary product."""
    moved = ctx.normalised_states[bases] + ctx.readout.normalise(scaled)
    return ctx.pair_logit_difference(moved) - ctx.target_log_probs[bases]


def rows_per_product(vocabulary: int, memory_budget: int) -> int:
    """Rows per vocabulary-sized product such that its two buffers (rows × V float32 each) fit the budget.
    Everything else in scoring grows with the prompt length only linearly and stays far below this for
    prompts of a few thousand tokens."""
    return max(1, min(EXACT_BATCH, memory_budget // smallest_budget(vocabulary)))


def device_budget(memory_budget: int, device: torch.device) -> int:
    """The budget, capped on a GPU at half the memory free there now (other work shares the device)."""
    if device.type != "cuda":
        return memory_budget
    free, _ = torch.cuda.mem_get_info(device)
    return min(memory_budget, free // 2)


def _balanced_batches(n: int, most: int) -> list[slice]:
    """Consecutive slices of at most `most` rows and near-equal size: a short tail batch would run the
    vocabulary-sized product at a fraction of the speed of a full one."""
    count = max(1, -(-n // most))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


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
    return _logsumexp_unshifted(x).add_(shift)


def _logsumexp_unshifted(x: Tensor) -> Tensor:
    """Row-wise log-sum-exp of x, overwriting x, where exp of every entry is known to be finite and the sum normal
    (see `_logsumexp_shifted`)."""
    return x.exp_().sum(dim=-1).log_()


@contextmanager
def _flushing_denormals():
    """exp() of log-probabilities below about −87 gives float32 denormals, which are very slow on CPUs and
    contribute nothing at this precision."""
    was_flushing = flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushing)  # the caller's thread is left as it was


def flushes_denormals() -> bool:
    """Whether this thread flushes float32 denormals to zero now. torch has no getter (`set_flush_denormal`
    returns whether the CPU supports it, not the previous state): a denormal times one tells."""
    return bool(torch.tensor(1e-40, dtype=torch.float32, device="cpu") * 1.0 == 0)

