"""torchao's weight-only tensor subclasses (int8, int4: `Int8Tensor`, `IntxUnpackedToInt8Tensor`, the packed int4
layouts of CUDA). Their forward pass dequantises the weight and multiplies in the activations' dtype; the subclass
slices like a tensor (whole quantisation groups) and dequantises the slice with its own `dequantize`, which is
what is read here. A layout that cannot be sliced along a dimension is dequantised whole, one layer at a time."""

from __future__ import annotations

from torch import Tensor, nn

from .matrix import QuantizedReader, aligned


def is_torchao(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and type(weight).__module__.startswith("torchao.") and \
        hasattr(weight, "dequantize")


class TorchAoReader(QuantizedReader):
    def __init__(self, module: nn.Module, name: str):
        self.weight = module.weight
        self.shape = (int(self.weight.shape[0]), int(self.weight.shape[1]))
        self.device = self.weight.device
        self.method = f"torchao ({type(self.weight).__name__})"
        block = [int(b) for b in getattr(self.weight, "block_size", (1, 1))]
        self.row_block, self.column_block = max(1, block[0]), max(1, block[-1])
        self._sliceable = {0: self._can_slice(0), 1: self._can_slice(1)}

    def _can_slice(self, dim: int) -> bool:
        block = self.row_block if dim == 0 else self.column_block
        try:
            part = self.weight.narrow(dim, 0, min(block, self.shape[dim]))
            return tuple(part.dequantize().shape) == tuple(s if d != dim else min(block, self.shape[dim])
                                                           for d, s in enumerate(self.shape))
        except Exception:  # noqa: BLE001 (layouts without slicing raise several kinds of error)
            return False

    def _slice(self, dim: int, start: int, stop: int) -> Tensor:
        block = self.row_block if dim == 0 else self.column_block
        if not self._sliceable[dim]:
            whole = self.weight.dequantize().float()
            return whole.narrow(dim, start, stop - start)
        first, last = aligned(start, stop, block, self.shape[dim])
        part = self.weight.narrow(dim, first, last - first).dequantize().float()
        return part.narrow(dim, start - first, stop - start)

    def rows(self, start: int, stop: int) -> Tensor:
        return self._slice(0, start, stop)

    def columns(self, start: int, stop: int) -> Tensor:
        return self._slice(1, start, stop)
