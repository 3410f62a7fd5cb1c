"""A very long prompt's value states, kept in a file instead of memory.

The value states are what a trace keeps at every position (L·T·d_kv float32 numbers: 755 MB at 32,768 tokens on
the default model, 4.3 GB at 8,192 on Llama-2-7B). On the CPU, past VALUES_IN_MEMORY_BYTES they are written to an
unlinked temporary file as the pass makes them, a layer's piece at a time, and read back a layer at a time where
scoring reads them, so the pass's peak holds its own activations and not the whole prompt's value states beside
them. The file lives in the system's temporary directory (`TMPDIR`; point it at a disk where /tmp is in memory)
and is gone when the trace is.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import Tensor

# Value states larger than this are kept in a file (CPU traces only; a GPU keeps them in its own memory).
VALUES_IN_MEMORY_BYTES = 256 * 2**20


def keeps_values_in_a_file(n_layers: int, n_tokens: int, n_kv_heads: int, head_dim: int,
                           device: torch.device) -> bool:
    """Whether a trace of this size on `device` keeps its value states in a file (where the system can read a
    file at an offset: not on Windows)."""
    size = 4 * n_layers * n_tokens * n_kv_heads * head_dim
    return device.type == "cpu" and size > VALUES_IN_MEMORY_BYTES and hasattr(os, "preadv")


class ValuesInFile:
    """(L, T, H_kv, d_h) float32 value states in a file. Indexing reads what it needs: `store[layer]` one layer,
    `store[layer, ...]` a part of one layer, and `store[layers, positions, kv_heads, dims]` with index tensors a
    gather, one read per layer it touches. The last layer read is kept, since callers read layer by layer."""

    def __init__(self, n_layers: int, n_tokens: int, n_kv_heads: int, head_dim: int):
        self.shape = torch.Size((n_layers, n_tokens, n_kv_heads, head_dim))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self._file = tempfile.TemporaryFile(prefix="neuron-attribution-values-")
        self._file.truncate(self._layer_bytes * n_layers)
        self._held: tuple[int, Tensor] | None = None

    @property
    def _layer_bytes(self) -> int:
        return 4 * self.shape[1] * self.shape[2] * self.shape[3]

    def write(self, layer: int, start: int, piece: Tensor) -> None:
        """Positions start.. of `layer` from a (t, H_kv, d_h) piece."""
        data = memoryview(piece.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()).cast("B")
        offset = layer * self._layer_bytes + 4 * start * self.shape[2] * self.shape[3]
        while data:
            written = os.pwrite(self._file.fileno(), data, offset)
            data, offset = data[written:], offset + written
        self._held = None

    def layer(self, layer: int) -> Tensor:
        """(T, H_kv, d_h): one layer's value states, read from the file (or the layer last read)."""
        if self._held is not None and self._held[0] == layer:
            return self._held[1]
        if not 0 <= layer < self.shape[0]:
            raise IndexError(f"layer {layer} of value states for {self.shape[0]} layers")
        values = torch.empty(self.shape[1:], dtype=torch.float32)
        view, offset = memoryview(values.numpy()).cast("B"), layer * self._layer_bytes
        while view:
            read = os.preadv(self._file.fileno(), [view], offset)
            if read == 0:
                raise OSError(f"the file of value states ended inside layer {layer}")
            view, offset = view[read:], offset + read
        self._held = (layer, values)
        return values

    def __getitem__(self, index) -> Tensor:
        if not isinstance(index, tuple):
            index = (index,)
        layer, rest = index[0], index[1:]
        if not isinstance(layer, Tensor):
            return self.layer(int(layer))[rest] if rest else self.layer(int(layer))
        layers = layer.to("cpu")
        rest = tuple(r.to("cpu") if isinstance(r, Tensor) else r for r in rest)
        shape = torch.broadcast_shapes(layers.shape, *[r.shape for r in rest if isinstance(r, Tensor)])
        layers = layers.expand(shape)
        rest = tuple(r.expand(shape) if isinstance(r, Tensor) else r for r in rest)
        result = torch.empty(shape, dtype=torch.float32)
        for value in torch.unique(layers).tolist():
            where = layers == value
            result[where] = self.layer(value)[tuple(r[where] if isinstance(r, Tensor) else r for r in rest)]
        return result.to(layer.device)
