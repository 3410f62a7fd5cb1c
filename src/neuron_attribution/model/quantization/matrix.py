"""A quantized layer's effective weight matrix, read a block of rows at a time and never held whole.

A `QuantizedReader` (one per quantisation method, in this package) answers two questions about one linear layer's
matrix W (out × in) exactly as the layer's forward pass uses it: a range of its rows and a range of its columns, in
float32. `DequantisedMatrix` puts a tensor's face on that: the orientation and shape the adapters ask for (W, Wᵀ,
rows reshaped into heads), where indexing returns float32 rows and `model/weights.py`'s `Matrix` streams it in
CHUNK_BYTES blocks like any other non-float32 weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class QuantizedReader(ABC):
    """One quantized linear layer's effective matrix W, (out, in)."""

    method: str  # as `load_model(quantization=...)` names it, or the checkpoint's own method
    shape: tuple[int, int]
    device: torch.device

    @abstractmethod
    def rows(self, start: int, stop: int) -> Tensor:
        """W[start:stop] in float32, (stop - start, in)."""

    @abstractmethod
    def columns(self, start: int, stop: int) -> Tensor:
        """W[:, start:stop] in float32, (out, stop - start)."""

    # Ranges are read in blocks of these many rows (columns) at least: the method's quantisation blocks.
    row_block: int = 1
    column_block: int = 1


class DequantisedMatrix:
    """W or Wᵀ of a `QuantizedReader`, its leading dimension possibly reshaped (heads × head_dim). Behaves like a
    float32 tensor of `shape` where scoring reads it: indexing (ints, slices, index tensors over the leading
    dimensions) returns float32 rows; `T`, `reshape` and `chunk` return other views of the same reader."""

    dtype = torch.float32

    def __init__(self, reader: QuantizedReader, transposed: bool = False, row_map: Tensor | None = None):
        self.reader, self.transposed = reader, transposed
        n_rows, self.width = reversed(reader.shape) if transposed else reader.shape
        self.row_map = torch.arange(n_rows) if row_map is None else row_map  # lead shape -> row of W (or Wᵀ)
        self.shape = torch.Size((*self.row_map.shape, self.width))
        self.device = reader.device

    def __repr__(self) -> str:
        return f"DequantisedMatrix({self.reader.method}, shape={tuple(self.shape)}, transposed={self.transposed})"

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def detach(self) -> DequantisedMatrix:
        return self

    @property
    def T(self) -> DequantisedMatrix:  # noqa: N802 (a tensor's name for it)
        if self.row_map.dim() != 1 or not torch.equal(self.row_map, torch.arange(len(self.row_map))):
            raise TypeError("only a whole quantized matrix can be transposed")
        return DequantisedMatrix(self.reader, not self.transposed)

    def reshape(self, *shape) -> DequantisedMatrix:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if shape[-1] not in (-1, self.width) or (shape[-1] == -1 and len(shape) == 1):
            raise TypeError(f"a quantized matrix keeps its rows whole: cannot reshape {tuple(self.shape)} to {shape}")
        return DequantisedMatrix(self.reader, self.transposed, self.row_map.reshape(shape[:-1]))

    def chunk(self, chunks: int, dim: int = 0) -> tuple[DequantisedMatrix, ...]:
        if dim not in (0, -self.dim()):
            raise TypeError("a quantized matrix is split along its rows only")
        return tuple(DequantisedMatrix(self.reader, self.transposed, part)
                     for part in self.row_map.chunk(chunks, dim=0))

    def view_of(self, index) -> DequantisedMatrix:
        """The rows `index` selects, as another view (not read): for adapters that slice fused projections."""
        return DequantisedMatrix(self.reader, self.transposed, self.row_map[index])

    def __getitem__(self, index) -> Tensor:
        picked = self.row_map[_on_cpu(_leading(index, self.row_map.dim()))]
        return self._read(picked.reshape(-1)).reshape(*picked.shape, self.width)

    def _read(self, rows: Tensor) -> Tensor:
        """float32 (n, width) for the given rows, reading each block of rows they fall in once."""
        if len(rows) == 0:
            return torch.empty(0, self.width, device=self.device)
        first, last = int(rows.min()), int(rows.max()) + 1
        if last - first == len(rows) and bool((rows.diff() == 1).all()):
            return self._range(first, last)
        block = self.reader.column_block if self.transposed else self.reader.row_block
        span = max(block, 256)
        out = torch.empty(len(rows), self.width, device=self.device)
        starts = rows.div(span, rounding_mode="floor")
        for start in torch.unique(starts).tolist():
            where = (starts == start).nonzero().squeeze(-1)
            begin = start * span
            piece = self._range(begin, min(begin + span, self._n_rows))
            out[where.to(self.device)] = piece[(rows[where] - begin).to(self.device)]
        return out

    @property
    def _n_rows(self) -> int:
        return self.reader.shape[1] if self.transposed else self.reader.shape[0]

    def _range(self, start: int, stop: int) -> Tensor:
        return self.reader.columns(start, stop).T if self.transposed else self.reader.rows(start, stop)


def _leading(index, lead_dims: int):
    """The index restricted to the leading dimensions (a trailing full slice over the row's width dropped)."""
    if not isinstance(index, tuple):
        return index
    if len(index) == lead_dims + 1 and isinstance(index[-1], slice) and index[-1] == slice(None):
        return index[:-1]
    if len(index) > lead_dims and index[-1] is not Ellipsis:
        raise TypeError("a quantized matrix is indexed by its rows; read them first to index within a row")
    return index


def _on_cpu(index):
    """Index tensors moved beside the row map (kept on the CPU: it is a few integers per row)."""
    if isinstance(index, Tensor):
        return index.cpu()
    if isinstance(index, tuple):
        return tuple(part.cpu() if isinstance(part, Tensor) else part for part in index)
    return index


def aligned(start: int, stop: int, block: int, total: int) -> tuple[int, int]:
    """[start, stop) widened to whole blocks of `block` (the end clipped to `total`)."""
    return start - start % block, min(total, -(-stop // block) * block)
