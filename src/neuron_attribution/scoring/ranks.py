"""Where a target token ranks in the vocabulary projection of every FFN value vector (a weight property)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..model.adapters import NormParams
from ..model.loaded import LoadedModel
from ..model.readout import project_to_vocabulary
from ..model.weights import LayerStack, Matrix
from .buffers import BoundedCache, caches_for

# Targets whose every-neuron exact ranks are kept (two (L, N) integer tensors each).
FULL_RANK_TARGETS = 16


class VocabularyRanks:
    """Rank of a target token in the vocabulary projection U(γ ⊙ centre(fc2)) of every FFN value vector,
    counted from the top (rank 1 = the token the vector promotes most) and from the bottom. A property of the
    weights alone.

    One pass over the weights keeps each vector's `depth` highest and lowest projection values. A token among
    them has its rank read off exactly (every value above it is there too); any other token's rank is known to
    exceed `depth`. The few neurons whose exact rank beyond that still matters are projected again one by one."""

    def __init__(self, ffn_values: LayerStack, norm: NormParams, unembedding: Matrix, depth: int = 256,
                 batch: int = 512):
        self.shape = (ffn_values.n_layers, ffn_values.n_rows)
        self.values = ffn_values
        self.total = ffn_values.n_layers * ffn_values.n_rows
        self.norm, self.unembedding = norm, unembedding
        self.depth, self.batch = min(depth, unembedding.shape[0]), batch
        self._extremes: dict[str, tuple[Tensor, Tensor]] | None = None  # "top"/"bottom" -> (ids, values)
        self._full = BoundedCache(FULL_RANK_TARGETS)

    def _project(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        return project_to_vocabulary(self.norm, self.unembedding, rows, out=out)

    def prepare(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The pass over the weights (once)."""
        if self._extremes is not None:
            return
        total, k, device = self.total, self.depth, self.values.device
        kept = {side: (torch.empty(total, k, dtype=torch.int32, device=device), torch.empty(total, k, device=device))
                for side in ("top", "bottom")}
        buffer = torch.empty(self.batch, self.unembedding.shape[0], device=device)
        for first, block in self.values.chunks():
            for start in range(0, len(block), self.batch):
                part = block[start: start + self.batch]
                rows = slice(first + start, first + start + len(part))
                projected = self._project(part, out=buffer[: len(part)])
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
            at_target = torch.where(hit, values, 0.0).sum(dim=-1, keepdim=True)
            beyond = values > at_target if side == "top" else values < at_target
            ranks = (beyond & present.unsqueeze(-1)).sum(dim=-1) + 1
            result.append(torch.where(present, ranks, torch.zeros_like(ranks)))
        return result[0], result[1]

    def exact(self, flat: Tensor, target: int) -> tuple[Tensor, Tensor]:
        """(from_top, from_bottom) ranks of `target` for the neurons at flat indices, by projecting them."""
        vocabulary = self.unembedding.shape[0]
        device = self.values.device
        projected_buffer = torch.empty(min(self.batch, flat.numel()), vocabulary, device=device)
        compared = torch.empty(projected_buffer.shape, dtype=torch.bool, device=device)
        from_top, from_bottom = [], []
        for start in range(0, flat.numel(), self.batch):
            rows = flat[start: start + self.batch]
            projected = self._project(self.values.flat_rows(rows), out=projected_buffer[: rows.numel()])
            at_target = projected[:, target: target + 1].clone()
            out = compared[: rows.numel()]
            from_top.append(torch.gt(projected, at_target, out=out).sum(dim=-1) + 1)
            from_bottom.append(torch.lt(projected, at_target, out=out).sum(dim=-1) + 1)
        if not from_top:
            return (torch.empty(0, dtype=torch.long, device=device),) * 2
        return torch.cat(from_top), torch.cat(from_bottom)

    def full(self, target: int) -> tuple[Tensor, Tensor]:
        """(from_top, from_bottom), each (L, N): every neuron's exact ranks (a pass over the weights; kept)."""
        held = self._full.get(target)
        if held is None:
            from_top, from_bottom = self.exact(torch.arange(self.total, device=self.values.device), target)
            held = (from_top.reshape(self.shape), from_bottom.reshape(self.shape))
            self._full.put(target, held)
        return held


def ranks_for(model: LoadedModel) -> VocabularyRanks:
    """The model's ranks, made once (the weight pass) and released with the model (`buffers.caches_for`)."""
    adapter = model.adapter
    caches = caches_for(adapter.ffn_value_stack)
    if caches.ranks is None:
        caches.ranks = VocabularyRanks(adapter.ffn_value_stack, adapter.final_norm(), adapter.unembedding_matrix)
    return caches.ranks
