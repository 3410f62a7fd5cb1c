"""Exact top-k from upper bounds: score items in descending bound order until nothing unscored can enter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Rounding lets an exact score exceed its analytic bound by ~1e-7; stop only when clear of that.
BOUND_SLACK = 1e-6
# `torch.topk` over n items takes about 12·n bytes of scratch on a CPU; a long prompt's attention bounds are
# searched this many at a time instead.
TOP_INDICES_CHUNK = 2**20


@dataclass
class TopK:
    indices: Tensor  # flat indices into the neuron set, best first
    scores: Tensor
    n_evaluated: int  # how many neurons were scored exactly
    # Per returned neuron, whatever the evaluator kept, by name (vocabulary ids, parts of the score, ...).
    extra: dict[str, Tensor] | None = None


class TopKSearch:
    """The k highest scores, given an upper bound per item: items are scored exactly in descending bound
    order until the k-th best exact score is at least the next bound, so no unevaluated item can enter.

    The caller scores `pending()` however it likes (sharing products with other work) and hands the scores
    back with `record()`, until `pending()` is None. Ties in score, and in bound, go to the lower index."""

    def __init__(self, bounds: Tensor | BlockBounds, k: int):
        self.bounds = bounds if isinstance(bounds, BlockBounds) else DenseBounds(bounds.reshape(-1))
        self.total = self.bounds.total
        self.k = min(k, self.total)
        self.position = 0
        # The bound is tight for all but the largest contributions, so a little over k usually settles it.
        self.batch = self.k + max(self.k // 8, 16)
        # Every item is scored whatever the bounds say: in index order, without sorting the bounds, so that items
        # next to each other (an attention vector's source positions) are scored side by side.
        self.everything = self.k == self.total
        self.order = torch.empty(0, dtype=torch.long, device=self.bounds.device) if self.everything else \
            self.bounds.top(min(self.total, 2 * self.batch))
        self.done: list[Tensor] = []
        self.scored: list[Tensor] = []
        self.extras: dict[str, list[Tensor]] = {}
        self.finished = self.k == 0

    def pending(self) -> Tensor | None:
        if self.finished:
            return None
        end = min(self.total, self.position + self.batch)
        if self.everything:
            return torch.arange(self.position, end, device=self.order.device)
        if end > self.order.numel():
            # Only the next stretch of the bound order is needed: a partial sort, not a sort of every item.
            self.order = self.bounds.top(min(self.total, self.position + 2 * self.batch))
        return self.order[self.position: end]

    def record(self, chunk: Tensor, scores: Tensor, extra: dict[str, Tensor] | None = None) -> None:
        self.done.append(chunk)
        self.scored.append(scores)
        for name, values in (extra or {}).items():
            self.extras.setdefault(name, []).append(values)
        self.position += chunk.numel()
        self.batch = max(self.k // 4, 32)
        if self.position >= self.total:
            self.finished = True
        elif self.position >= self.k:
            kth = torch.cat(self.scored).topk(self.k).values[-1]
            if self.position >= self.order.numel():
                self.order = self.bounds.top(min(self.total, self.position + 1))
            self.finished = bool(kth >= self.bounds.at(self.order[self.position: self.position + 1])[0] + BOUND_SLACK)

    def result(self) -> TopK:
        if not self.done:
            device = self.order.device
            return TopK(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device), 0, None)
        indices, scores = torch.cat(self.done), torch.cat(self.scored)
        ranking = rank_by_score(scores, indices)[: self.k]
        extra = {name: torch.cat(parts)[ranking] for name, parts in self.extras.items()}
        return TopK(indices[ranking], scores[ranking], self.position, extra or None)


def exact_top_k(bounds: Tensor | BlockBounds, evaluate: Callable[[Tensor], tuple[Tensor, dict[str, Tensor] | None]],
                k: int) -> TopK:
    """`TopKSearch` run to the end with one evaluator."""
    search = TopKSearch(bounds, k)
    while (chunk := search.pending()) is not None:
        search.record(chunk, *evaluate(chunk))
    return search.result()


@dataclass
class DenseBounds:
    """One bound per item, held whole."""

    values: Tensor  # (n,)

    @property
    def total(self) -> int:
        return self.values.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    def top(self, count: int) -> Tensor:
        return top_indices(self.values, count)

    def at(self, indices: Tensor) -> Tensor:
        return self.values[indices]


class BlockBounds:
    """Bounds of items laid out in rows of `width`, held only as the largest bound in each block of `block`
    consecutive items of a row (a row's last block may be shorter); the items' own bounds are made, by
    `bounds_of(flat indices)`, for the blocks a search reaches, in descending order of their maxima. `top` gives
    exactly what `top_indices` would over every item's bound: it expands blocks until the count-th best expanded
    bound is above every unexpanded block's maximum, so nothing outside can belong, ties included. A long prompt's
    attention neurons are searched this way without a bound per neuron held at once."""

    def __init__(self, maxima: Tensor, width: int, block: int, bounds_of: Callable[[Tensor], Tensor],
                 first_blocks: int = 64):
        self.maxima = maxima.reshape(-1)
        self.first_blocks = first_blocks  # the fewest blocks expanded at once (then twice as many as so far)
        self.width, self.block = width, block
        self.blocks_per_row = -(-width // block)
        self.total = self.maxima.numel() // self.blocks_per_row * width
        self.bounds_of = bounds_of
        device = self.maxima.device
        self.items = torch.empty(0, dtype=torch.long, device=device)
        self.values = torch.empty(0, device=device)
        self.block_order = torch.empty(0, dtype=torch.long, device=device)
        self.n_expanded = 0  # blocks expanded, a prefix of the descending order of maxima

    @property
    def device(self) -> torch.device:
        return self.maxima.device

    def top(self, count: int) -> Tensor:
        n_blocks = self.maxima.numel()
        while self.n_expanded < n_blocks:
            if self.values.numel() >= count:
                kth = self.values.topk(count).values[-1] if count else self.values.new_tensor(float("inf"))
                if bool(kth > self.maxima[self._next_blocks(1)[0]]):
                    break
            wanted = max(2 * -(-count // self.block), self.n_expanded, self.first_blocks)
            self._expand(self._next_blocks(wanted))
        return self.items[rank_by_score(self.values, self.items)[:count]]

    def at(self, indices: Tensor) -> Tensor:
        return self.bounds_of(indices)

    def _next_blocks(self, count: int) -> Tensor:
        end = min(self.maxima.numel(), self.n_expanded + count)
        if end > self.block_order.numel():
            grown = max(end, 2 * self.block_order.numel())
            self.block_order = top_indices(self.maxima, min(self.maxima.numel(), grown))
        return self.block_order[self.n_expanded: end]

    def _expand(self, blocks: Tensor) -> None:
        rows, starts = blocks // self.blocks_per_row, blocks % self.blocks_per_row * self.block
        offsets = torch.arange(self.block, device=blocks.device)
        positions = starts.unsqueeze(1) + offsets
        items = (rows.unsqueeze(1) * self.width + positions)[positions < self.width]
        self.items = torch.cat([self.items, items])
        self.values = torch.cat([self.values, self.bounds_of(items)])
        self.n_expanded += blocks.numel()


def top_indices(values: Tensor, count: int, chunk: int = TOP_INDICES_CHUNK) -> Tensor:
    """Indices of the `count` largest of a 1-D tensor, by descending value, ties to the lower index: the same
    order on every call, so successive prefixes of a growing search agree. Taken a chunk at a time: each chunk's
    candidates are every item at least its count-th value (all of a tie), so nothing that belongs is lost."""
    candidates = []
    for start in range(0, values.numel(), chunk):
        part = values[start: start + chunk]
        if part.numel() > count:
            threshold = part.topk(count).values[-1]
            kept = torch.nonzero(part >= threshold).squeeze(1)
        else:
            kept = torch.arange(part.numel(), device=values.device)
        candidates.append(kept + start)
    indices = torch.cat(candidates) if candidates else torch.empty(0, dtype=torch.long, device=values.device)
    return indices[rank_by_score(values[indices], indices)[:count]]


def rank_by_score(scores: Tensor, indices: Tensor | None = None) -> Tensor:
    """Positions sorted by descending score, ties to the lower index (`indices`: each position's index; default:
    the position itself)."""
    if indices is None:
        return torch.argsort(scores, descending=True, stable=True)
    by_index = torch.argsort(indices, stable=True)
    return by_index[torch.argsort(scores[by_index], descending=True, stable=True)]


