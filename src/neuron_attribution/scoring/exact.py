"""Exact scores of many vectors at once: one full-vocabulary log-softmax per row, in shared products."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .buffers import smallest_budget
from .context import ValueContext
from .progress import report

EXACT_BATCH = 512  # most rows per vocabulary-sized product: (512, V) float32 is 100 MB for V = 49k
# Rows whose logit changes c·δ are read at once (projection ids, the target's push rank): a (rows, V) buffer.
PROJECTED_ROWS = 64
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
    markedly faster on a few hundred rows than on a few dozen. The logits of state_b + c·u come out of one fused
    product (the readout is linear), so no vocabulary-sized base has to be gathered per row. `reported`: progress
    goes to the reporter (off where the caller reports a larger whole)."""
    if not groups:
        return []
    device = ctx.device
    bases = torch.cat([g.bases for g in groups])
    scaled = torch.cat([g.scaled() for g in groups])
    signs = torch.cat([torch.ones(len(g), device=device) if g.coefficients is None else g.coefficients.sign()
                       for g in groups])
    keep = torch.cat([torch.full((len(g),), g.projection, dtype=torch.long, device=device) for g in groups])
    width = max(g.projection for g in groups)
    scores = torch.empty(len(bases), device=device)
    projection = torch.zeros(len(bases), 2 * width, dtype=torch.long, device=device)
    readout = ctx.readout
    keys = torch.cat([g.keys if g.keys is not None else torch.full((len(g),), -1, device=device) for g in groups])
    if ctx.contrast is not None:
        scores = _contrast_scores(ctx, bases, scaled)
        if width:
            wanted = (keep > 0).nonzero().squeeze(-1)
            projection[wanted] = _cached_projection_ids(ctx, bases, wanted, scaled, signs, keys, width)
        return _split(groups, scores, projection, scores, None)
    vocabulary = readout.unembedding.shape[0]
    shared = _SharedProjections(width)
    direct = torch.empty(len(bases), device=device)
    push_rank = torch.zeros(len(bases), dtype=torch.long, device=device)
    with _flushing_denormals():
        budget = ctx.memory_budget if ctx.budget_fixed else device_budget(ctx.memory_budget, device)
        most = rows_per_product(vocabulary, budget)
        riders = ctx.states_to_read()
        if riders is not None and 2 * len(riders) > most:
            ctx.read_bases()  # a budget this small reads them in a product of their own
            riders = None
        n_riders = 0 if riders is None else len(riders)
        batches = _balanced_batches(n_riders + len(bases), most)
        # On the CPU one buffer of the budget's size for the session, never re-made at each call's largest
        # batch: re-made at varying sizes it fragmented the heap (hundreds of MB of resident memory over a few
        # calls), and pages a call does not write are never touched. A GPU's caching allocator has no such
        # trouble but does hold what is allocated, so there the buffer is the call's largest batch.
        rows_held = most if device.type == "cpu" else max(b.stop - b.start for b in batches)
        buffer = ctx.caches.scratch.buffer("logits", rows_held, vocabulary, device)
        # the bases ride in the first product (balanced batches are at least half of `most` rows each)
        for combined in batches:
            riding = n_riders if combined.start == 0 else 0
            rows = slice(combined.start + riding - n_riders, combined.stop - n_riders)
            size = rows.stop - rows.start
            moved = ctx.normalised_states[bases[rows]] + readout.normalise(scaled[rows])
            if riding:
                moved = torch.cat([riders, moved])
            logits = readout.logits_of_normalised(moved, out=buffer[: riding + size])
            if riding:
                ctx.take_base_logits(logits[:riding])
                logits = logits[riding:]
            if width:
                wanted = (keep[rows] > 0).nonzero().squeeze(-1)
                projection[rows][wanted], push_rank[rows][wanted] = shared.read(
                    ctx, logits, bases[rows], scaled[rows], signs[rows], keys[rows], wanted)
            target_logit = logits[:, ctx.target].clone()
            direct[rows] = target_logit - ctx.base_target_logits[bases[rows]]
            reach = readout.max_logit_change(scaled[rows])
            shift = ctx.base_log_sum_exp[bases[rows]]
            log_sum_exp = _logsumexp_shifted(logits, shift) if bool((reach < _SAFE_EXPONENT).all()) \
                else _logsumexp_inplace(logits)
            scores[rows] = target_logit - log_sum_exp - ctx.target_log_probs[bases[rows]]
            if reported:
                report(f"scoring {len(bases):,} neurons exactly", rows.stop, len(bases))
    return _split(groups, scores, projection, direct, push_rank)


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


class _SharedProjections:
    """Projection ids and the target's push rank of the rows of one call, each neuron's read once: an attention
    neuron's vector is the same at every source position (only its coefficient differs), so its ids come from
    one row, and so do the counts of tokens its δ raises more, and less, than the target, from which a row of
    either sign has its push rank. Every neuron scored at once reads a vocabulary-sized row for 63k neurons
    instead of 132k on SmolLM2. Rows without a key, or with a zero coefficient (all changes equal), are read on
    their own."""

    def __init__(self, width: int):
        self.width = width
        # key → (ids, #δ_v > δ_w, #δ_v < δ_w, the size of the coefficient of the row they were read from)
        self.known: dict[int, tuple[Tensor, int, int, float]] = {}

    def read(self, ctx: ValueContext, logits: Tensor, bases: Tensor, scaled: Tensor, signs: Tensor, keys: Tensor,
             wanted: Tensor) -> tuple[Tensor, Tensor]:
        """(ids (n, 2k), push ranks (n,)) of the wanted rows of one batch of fused logits."""
        key_list, sign_list = keys[wanted].tolist(), signs[wanted].tolist()
        # A row reads for its neuron only where no row with a larger coefficient has: the fused logits' rounding
        # is a smaller part of the changes c·δ the larger c is.
        sizes = scaled[wanted].abs().amax(dim=-1).tolist()
        own, first_of, reused = [], {}, []
        for i, (key, sign) in enumerate(zip(key_list, sign_list)):
            if key < 0 or sign == 0:
                own.append(i)
                continue
            held = self.known.get(key)
            if held is not None and held[3] >= sizes[i]:
                reused.append(i)
            elif key not in first_of or sizes[i] > sizes[first_of[key]]:
                if key in first_of:
                    reused.append(first_of[key])
                first_of[key] = i
            else:
                reused.append(i)
        own.extend(first_of.values())
        ids = torch.empty(len(key_list), 2 * self.width, dtype=torch.long, device=logits.device)
        ranks = torch.empty(len(key_list), dtype=torch.long, device=logits.device)
        read = torch.tensor(own, dtype=torch.long, device=logits.device)
        counted = {i: key for key, i in first_of.items()}
        for part in read.split(PROJECTED_ROWS):
            rows = wanted[part]
            changes = _logit_changes(ctx, logits, bases, rows, scaled)
            ids[part] = _projection_ids(changes, self.width, signs[rows])
            at_target = changes[:, ctx.target: ctx.target + 1]
            # Counted as 0/1 floats in a kept buffer: a bool's sum first copies it to int64 (on Gemma's
            # 262k-token rows 3x slower). The counts stay below 2^24, where float32 holds integers exactly.
            flags = ctx.caches.scratch.buffer("comparisons", *changes.shape, changes.device)
            above = torch.gt(changes, at_target, out=flags).sum(dim=-1).long()
            ranks[part] = above + 1
            positions = part.tolist()
            sharing = [j for j, i in enumerate(positions) if i in counted]
            if sharing:
                below = torch.lt(changes, at_target, out=flags).sum(dim=-1).long().tolist()
                for j in sharing:
                    fewer = below[j]
                    i, more = positions[j], int(above[j])
                    raised, lowered = (more, fewer) if sign_list[i] > 0 else (fewer, more)
                    self.known[counted[i]] = (ids[i].clone(), raised, lowered, sizes[i])
        if reused:
            entries = [self.known[key_list[i]] for i in reused]
            where = torch.tensor(reused, dtype=torch.long, device=logits.device)
            ids[where] = torch.stack([entry[0] for entry in entries])
            ranks[where] = torch.tensor([1 + (entry[1] if sign_list[i] > 0 else entry[2])
                                         for i, entry in zip(reused, entries)], dtype=torch.long, device=logits.device)
        return ids, ranks


# Vocabulary projections of FFN neurons are properties of the weights: top(δ(u)) and bottom(δ(u)) do not depend
# on the prompt, the coefficient's sign or the norm's frozen scale. Kept per model (`ctx.caches.projections`).


def _cached_projection_ids(ctx: ValueContext, bases: Tensor, wanted: Tensor, scaled: Tensor, signs: Tensor,
                           keys: Tensor, width: int) -> Tensor:
    """Projection ids of the wanted rows, computed once per (model, neuron): the contrastive path has no fused
    logits to read them from, and one vocabulary product per returned neuron is most of its cost."""
    cache = ctx.caches.projections
    ids = torch.empty(len(wanted), 2 * width, dtype=torch.long, device=ctx.device)
    wanted_keys = keys[wanted].tolist()
    missing = []
    for i, key in enumerate(wanted_keys):
        held = cache.get((key, width))
        if held is not None:
            ids[i] = held
        else:
            missing.append(i)
    if missing:
        rows = wanted[missing]
        ids[missing] = _projection_ids(_logit_changes(ctx, None, bases, rows, scaled), width, signs[rows])
        for i in missing:
            if wanted_keys[i] >= 0:  # rows without a neuron key are not cached
                cache.put((wanted_keys[i], width), ids[i].clone())
    return ids


def _contrast_scores(ctx: ValueContext, bases: Tensor, scaled: Tensor) -> Tensor:
    """Imp_target − Imp_contrast for every row: the change of z_target − z_contrast. The log-sum-exp cancels,
    so two logits per row are all it takes: no vocabulary product."""
    moved = ctx.normalised_states[bases] + ctx.readout.normalise(scaled)
    return ctx.pair_logit_difference(moved) - ctx.target_log_probs[bases]


def _logit_changes(ctx: ValueContext, logits: Tensor | None, bases: Tensor, wanted: Tensor, scaled: Tensor
                   ) -> Tensor:
    """c·δ for the wanted rows, up to a per-row constant. From the fused logits z(x) + c·δ, subtracting the
    base's log-probabilities leaves exactly that; where there are no fused logits (contrastive scoring) or they
    are soft-capped (not linear), δ is computed directly."""
    if ctx.readout.softcap is not None or logits is None:
        return ctx.readout.unembedding.times_transposed(ctx.readout.normalise(scaled[wanted]))
    # Both gathered into buffers kept across calls: a vocabulary-sized temporary per chunk fragments the heap
    # (the resident memory grew by hundreds of MB over a few hundred chunks).
    scratch, shape = ctx.caches.scratch, (wanted.numel(), logits.shape[1], logits.device)
    base = torch.index_select(ctx.base_log_probs, 0, bases[wanted], out=scratch.buffer("bases", *shape))
    return torch.index_select(logits, 0, wanted, out=scratch.buffer("fused rows", *shape)).sub_(base)


def _projection_ids(changes: Tensor, k: int, signs: Tensor) -> Tensor:
    """Top-k then bottom-k ids of δ(u) from rows of c·δ (+ a constant per row); where c < 0 the order of δ is
    the reverse of that of c·δ."""
    top, bottom = largest_and_smallest(changes, k)
    negative = (signs < 0).unsqueeze(-1)
    return torch.cat([torch.where(negative, bottom, top), torch.where(negative, top, bottom)], dim=-1)


# Block width of the two-step top-k: a row is read once for its blocks' extremes, then only k blocks are searched.
_BLOCK = 64


def largest_and_smallest(rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row, the ids of the k largest entries (descending) and of the k smallest (ascending): `topk`'s ids,
    except that where equal values straddle the k-th place either may be the one taken. Every one of the k
    largest lies in a block whose maximum is among the k largest block maxima (the k-th largest maximum is
    itself an entry, so no larger than the k-th largest entry), so one
    pass for the blocks' maxima and minima and a search of 2k blocks replace two full searches: about three
    times faster on a vocabulary-sized row."""
    n, width = rows.shape
    blocks = width // _BLOCK
    if blocks < 4 * k or not rows.is_contiguous():
        return rows.topk(k, dim=-1).indices, rows.topk(k, dim=-1, largest=False).indices
    whole = rows[:, : blocks * _BLOCK].view(n, blocks, _BLOCK)
    tail = rows[:, blocks * _BLOCK:]
    offsets = torch.arange(_BLOCK, device=rows.device)
    tail_ids = torch.arange(blocks * _BLOCK, width, device=rows.device).expand(n, -1)
    ends = []
    for extremes, largest in ((whole.amax(dim=-1), True), (whole.amin(dim=-1), False)):
        chosen = extremes.topk(k, dim=-1, largest=largest).indices  # (n, k) blocks
        candidates = whole.gather(1, chosen.unsqueeze(-1).expand(-1, -1, _BLOCK)).reshape(n, k * _BLOCK)
        ids = (chosen.unsqueeze(-1) * _BLOCK + offsets).reshape(n, k * _BLOCK)
        candidates, ids = torch.cat([candidates, tail], dim=1), torch.cat([ids, tail_ids], dim=1)
        ends.append(ids.gather(1, candidates.topk(k, dim=-1, largest=largest).indices))
    return ends[0], ends[1]


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
    return x.exp_().sum(dim=-1).log_().add_(shift)


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

