"""What a scored row shows besides its score, read off its logit changes: the ids of the tokens its contribution
raises and lowers most (its vocabulary projection) and the target's rank among the tokens it pushes."""

from __future__ import annotations

import torch
from torch import Tensor

from .context import ValueContext

# Rows whose logit changes c·δ are read at once (projection ids, the target's push rank): a (rows, V) buffer.
PROJECTED_ROWS = 64


def direction_projections(ctx: ValueContext, deltas: Tensor, pairs: Tensor, negative: Tensor, width: int
                          ) -> tuple[Tensor, Tensor]:
    """(ids (n, 2k), push ranks (n,)) of n rows of coefficient c along the directions δ(u) `deltas[pairs]`, each
    direction read once: the top and bottom of δ(u) are the same for either sign of c, and the target's rank among
    the tokens c·δ pushes is 1 + the count of tokens δ raises more than the target (c ≥ 0) or less (c < 0)."""
    read = torch.unique(pairs)
    ids = torch.empty(len(read), 2 * width, dtype=torch.long, device=deltas.device)
    above = torch.empty(len(read), dtype=torch.long, device=deltas.device)
    below = torch.empty_like(above)
    consecutive = int(read[-1] - read[0]) + 1 == len(read)
    for chunk in torch.arange(len(read), device=deltas.device).split(PROJECTED_ROWS):
        if consecutive:  # the usual case: a view, not a vocabulary-sized copy
            first = int(read[chunk[0]])
            directions = deltas[first: first + len(chunk)]
        else:
            directions = torch.index_select(deltas, 0, read[chunk], out=ctx.caches.scratch.buffer(
                "fused rows", len(chunk), deltas.shape[1], deltas.device))
        ids[chunk] = projection_ids(directions, width, torch.ones(len(chunk), device=deltas.device))
        above[chunk], below[chunk] = counts_beside_target(ctx, directions)
    where = torch.searchsorted(read, pairs)
    return ids[where], 1 + torch.where(negative, below[where], above[where])


def counts_beside_target(ctx: ValueContext, changes: Tensor, below: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per row of logit changes, how many tokens change more than the target, and (with `below`) how many less.
    Counted as 0/1 floats in a kept buffer: a bool's sum first copies it to int64 (on Gemma's 262k-token rows 3x
    slower). The counts stay below 2^24, where float32 holds integers exactly."""
    at_target = changes[:, ctx.target: ctx.target + 1]
    flags = ctx.caches.scratch.buffer("comparisons", *changes.shape, changes.device)
    above = torch.gt(changes, at_target, out=flags).sum(dim=-1).long()
    return above, torch.lt(changes, at_target, out=flags).sum(dim=-1).long() if below else None


class SharedProjections:
    """Projection ids and the target's push rank of the rows of one call read from fused logits (rows of no
    neuron, and every row under soft-capped logits, which are not scored along their direction), each neuron's
    read once: an attention neuron's vector is the same at every source position (only its coefficient differs),
    so its ids come from one row, and so do the counts of tokens its δ raises more, and less, than the target, from
    which a row of either sign has its push rank. Rows without a key, or with a zero coefficient (all changes
    equal), are read on their own."""

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
            changes = logit_changes(ctx, logits, bases, rows, scaled)
            ids[part] = projection_ids(changes, self.width, signs[rows])
            positions = part.tolist()
            sharing = [j for j, i in enumerate(positions) if i in counted]
            above, below = counts_beside_target(ctx, changes, below=bool(sharing))
            ranks[part] = above + 1
            if sharing:
                below = below.tolist()
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


def cached_projection_ids(ctx: ValueContext, bases: Tensor, wanted: Tensor, scaled: Tensor, signs: Tensor,
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
        ids[missing] = projection_ids(logit_changes(ctx, None, bases, rows, scaled), width, signs[rows])
        for i in missing:
            if wanted_keys[i] >= 0:  # rows without a neuron key are not cached
                cache.put((wanted_keys[i], width), ids[i].clone())
    return ids


def logit_changes(ctx: ValueContext, logits: Tensor | None, bases: Tensor, wanted: Tensor, scaled: Tensor
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


def projection_ids(changes: Tensor, k: int, signs: Tensor) -> Tensor:
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
