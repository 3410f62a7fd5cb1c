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

    def __init__(self, bounds: Tensor, k: int):
        self.bounds = bounds.reshape(-1)
        self.total = self.bounds.numel()
        self.k = min(k, self.total)
        self.position = 0
        # The bound is tight for all but the largest contributions, so a little over k usually settles it.
        self.batch = self.k + max(self.k // 8, 16)
        self.order = top_indices(self.bounds, min(self.total, 2 * self.batch))
        self.done: list[Tensor] = []
        self.scored: list[Tensor] = []
        self.extras: dict[str, list[Tensor]] = {}
        self.finished = self.k == 0

    def pending(self) -> Tensor | None:
        if self.finished:
            return None
        end = min(self.total, self.position + self.batch)
        if end > self.order.numel():
            # Only the next stretch of the bound order is needed: a partial sort, not a sort of every item.
            self.order = top_indices(self.bounds, min(self.total, self.position + 2 * self.batch))
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
                self.order = top_indices(self.bounds, min(self.total, self.position + 1))
            self.finished = bool(kth >= self.bounds[self.order[self.position]] + BOUND_SLACK)

    def result(self) -> TopK:
        if not self.done:
            device = self.bounds.device
            return TopK(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device), 0, None)
        indices, scores = torch.cat(self.done), torch.cat(self.scored)
        ranking = rank_by_score(scores, indices)[: self.k]
        extra = {name: torch.cat(parts)[ranking] for name, parts in self.extras.items()}
        return TopK(indices[ranking], scores[ranking], self.position, extra or None)


def exact_top_k(bounds: Tensor, evaluate: Callable[[Tensor], tuple[Tensor, dict[str, Tensor] | None]], k: int
                ) -> TopK:
    """`TopKSearch` run to the end with one evaluator."""
    search = TopKSearch(bounds, k)
    while (chunk := search.pending()) is not None:
        search.record(chunk, *evaluate(chunk))
    return search.result()


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


