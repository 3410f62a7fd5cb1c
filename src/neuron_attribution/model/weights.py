"""Weight matrices read where they live, never copied whole.

Scoring needs, from the weights, float32 rows (a neuron's vector), products of many vectors with a matrix (bounds,
logits) and norms of every row. A `Matrix` answers those from the model's own parameter, in the model's dtype and
on its device: a float32 matrix is read in place; any other dtype is converted to float32 a chunk of rows at a
time, so no float32 copy proportional to the model is ever held. Under `device="auto"` a layer's matrix stays on
its own GPU: the vectors travel to it and the (small) results travel back. A `LayerStack` is one such matrix per
layer, with the layer's post-norm gain folded in where the block has one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Bytes of float32 one chunk of a converted (non-float32) matrix may take.
CHUNK_BYTES = 64 * 1024**2


class RowParts:
    """Several (R_i, d) matrices read as one (ΣR_i, d) matrix, without joining them: a mixture-of-experts layer's
    value vectors are each expert's slice of a 3-D parameter (transposed, so no single view covers them all), then
    the shared expert's. Indexing answers the rows asked for; only those are copied."""

    def __init__(self, parts: list[Tensor]):
        self.parts = [part.detach() for part in parts]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.shape[0])
        first = self.parts[0]
        self.shape = torch.Size((self.starts[-1], first.shape[1]))
        # One dtype for every part's rows: float32 where the parts differ (a quantized shared expert beside
        # bfloat16 experts reads as float32; rounding it to the experts' dtype would change it).
        dtypes = {part.dtype for part in self.parts}
        self.dtype, self.device = (first.dtype if len(dtypes) == 1 else torch.float32), first.device

    def __len__(self) -> int:
        return self.starts[-1]

    def detach(self) -> RowParts:
        return self

    def _part_of(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def __getitem__(self, index: int | slice | Tensor) -> Tensor:
        if isinstance(index, int):
            row = index % len(self)
            part = self._part_of(row)
            return self.parts[part][row - self.starts[part]]
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            pieces = [part[max(start - first, 0): max(min(stop - first, len(part)), 0)]
                      for part, first in zip(self.parts, self.starts)]
            pieces = [piece for piece in pieces if len(piece)]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else self.parts[0][:0]
        index = index.reshape(-1).to(self.device)
        out = torch.empty(len(index), self.shape[1], dtype=self.dtype, device=self.device)
        bounds = torch.tensor(self.starts[1:], device=self.device)
        owners = torch.searchsorted(bounds, index, right=True)
        for part in torch.unique(owners).tolist():
            where = owners == part
            out[where] = self.parts[part][index[where] - self.starts[part]]
        return out


@dataclass(eq=False)
class Matrix:
    """An (R, d) weight matrix (possibly a strided view, such as a transposed projection), with an optional (d,)
    float32 gain multiplying every row. Results come back on `device`, the scoring device."""

    weight: Tensor | RowParts
    device: torch.device
    gain: Tensor | None = None  # on the weight's device
    chunk_bytes: int | None = None  # None: CHUNK_BYTES
    _norms: Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, weight: Tensor | RowParts, device: torch.device, gain: Tensor | None = None) -> Matrix:
        weight = weight.detach()
        return cls(weight, torch.device(device), None if gain is None else gain.to(weight.device, torch.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def in_place(self) -> bool:
        """A float32 matrix is read as it is, whole."""
        return isinstance(self.weight, Tensor) and self.weight.dtype == torch.float32

    def _rows_per_chunk(self) -> int:
        return max(1, (self.chunk_bytes or CHUNK_BYTES) // (4 * self.weight.shape[1]))

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, float32 block with the gain applied), on the weight's device."""
        total = self.weight.shape[0]
        step = total if self.in_place and self.gain is None else self._rows_per_chunk()
        for start in range(0, total, step):
            rows = slice(start, min(start + step, total))
            yield rows, self._float(self.weight[rows])

    def _float(self, block: Tensor) -> Tensor:
        block = block.to(torch.float32)
        return block if self.gain is None else block * self.gain

    def rows(self, index: Tensor) -> Tensor:
        """(n, d) float32 rows, on the scoring device."""
        picked = self.weight[index.to(self.weight.device)]
        return self._float(picked).to(self.device)

    def row(self, index: int) -> Tensor:
        return self._float(self.weight[index]).to(self.device)

    def times_transposed(self, vectors: Tensor, out: Tensor | None = None) -> Tensor:
        """vectors @ Wᵀ: (n, d) → (n, R), on the vectors' device (`out`: a buffer there to write into)."""
        here = vectors.to(self.weight.device)
        if self.gain is not None:
            here = here * self.gain  # (x ⊙ γ)·W_r = x·(W_r ⊙ γ)
        if self.in_place:
            if out is not None and out.device == here.device:
                return torch.matmul(here, self.weight.T, out=out)
            result = torch.matmul(here, self.weight.T).to(vectors.device)
            return result if out is None else out.copy_(result)
        result = out if out is not None else torch.empty(len(vectors), self.weight.shape[0], device=vectors.device)
        step = self._rows_per_chunk()
        for start in range(0, self.weight.shape[0], step):
            rows = slice(start, min(start + step, self.weight.shape[0]))
            result[:, rows] = (here @ self.weight[rows].to(torch.float32).T).to(result.device)
        return result

    def times_transposed_where(self, vectors: Tensor, active: Tensor) -> Tensor:
        """vectors @ Wᵀ where `active` (R,) is true, zero elsewhere: a mixture's matrix reads only the experts
        with an active row (what the forward pass read), any other matrix all of its rows."""
        if not isinstance(self.weight, RowParts):
            return self.times_transposed(vectors)
        result = torch.zeros(len(vectors), self.weight.shape[0], device=vectors.device)
        starts = self.weight.starts
        for part, (start, stop) in zip(self.weight.parts, zip(starts, starts[1:])):
            if bool(active[start:stop].any()):
                # an expert read like any matrix: whole in float32, else a CHUNK_BYTES block of rows at a time
                expert = Matrix(part, self.device, self.gain, self.chunk_bytes)
                result[:, start:stop] = expert.times_transposed(vectors)
        return result

    def part(self, rows: range) -> Matrix:
        """The matrix of a contiguous range of rows (a mixture's expert), read where it lives like this one."""
        return Matrix(self.weight[rows.start: rows.stop], self.device, self.gain, self.chunk_bytes)

    def transposed_times(self, weights: Tensor) -> Tensor:
        """weights @ W: (n, R) → (n, d), Σ_r weights[:, r]·W_r, on the weights' device."""
        here = weights.to(self.weight.device)
        total = None
        for rows, block in self.chunks():
            part = here[:, rows] @ block
            total = part if total is None else total.add_(part)
        return total.to(weights.device)

    def norms(self) -> Tensor:
        """(R,) ‖W_r‖ of every row (computed once), on the scoring device."""
        if self._norms is None:
            self._norms = torch.cat([block.norm(dim=-1) for _, block in self.chunks()]).to(self.device)
        return self._norms


def as_matrix(weight: Matrix | Tensor) -> Matrix:
    """A Matrix as it is; a tensor read where it lives, results beside it."""
    return weight if isinstance(weight, Matrix) else Matrix.of(weight, weight.device)


@dataclass(eq=False)
class LayerStack:
    """One (R, d) `Matrix` per layer, R rows each (FFN value vectors: R = N; attention output vectors: R = H·d_h),
    indexed as (layer, row) or by flat index layer·R + row."""

    layers: list[Matrix]
    device: torch.device
    # Results that later layers derive from these weights and keep between calls (scoring's buffers and
    # caches): they live and die with the stack, which the adapter makes anew when the weights change.
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_rows(self) -> int:
        return self.layers[0].shape[0]

    @property
    def width(self) -> int:
        return self.layers[0].shape[1]

    def rows(self, layers: Tensor, rows: Tensor) -> Tensor:
        """(n, d) float32 rows (layers[i], rows[i]), on the scoring device, in the order given."""
        layers, rows = layers.reshape(-1), rows.reshape(-1)
        out = torch.empty(len(layers), self.width, device=self.device)
        for layer in torch.unique(layers).tolist():
            where = (layers == layer).nonzero().squeeze(-1)
            out[where] = self.layers[layer].rows(rows[where])
        return out

    def flat_rows(self, flat: Tensor) -> Tensor:
        return self.rows(flat // self.n_rows, flat % self.n_rows)

    def dots(self, directions: Tensor, active: Tensor | None = None) -> Tensor:
        """(L, R): row r of layer l times directions[l], for (L, d) directions; (L, G, R) for (L, G, d).
        `active` (L, R): rows whose dots are wanted (the others may come back zero; see
        `Matrix.times_transposed_where`)."""
        single = directions.dim() == 2
        per_layer = directions.unsqueeze(1) if single else directions
        result = torch.stack([m.times_transposed(per_layer[l]) if active is None else
                              m.times_transposed_where(per_layer[l], active[l]) for l, m in enumerate(self.layers)])
        return result.squeeze(1) if single else result

    def norms(self) -> Tensor:
        """(L, R) row norms (computed once per layer)."""
        return torch.stack([m.norms() for m in self.layers])

    def combine(self, layer: int, weights: Tensor) -> Tensor:
        """(K, d): Σ_r weights[k, r]·(row r of `layer`) for (K, R) weights."""
        return self.layers[layer].transposed_times(weights)

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """(flat index of the first row, float32 block on the scoring device) over every layer's rows."""
        for l, matrix in enumerate(self.layers):
            for rows, block in matrix.chunks():
                yield l * self.n_rows + rows.start, block.to(self.device)
