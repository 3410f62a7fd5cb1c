"""bitsandbytes' 4-bit (NF4, FP4, with or without double quantisation) and 8-bit (LLM.int8) linear layers.

4-bit: W is stored as 4-bit codes in blocks of `blocksize` consecutive values of the row-major matrix, each block
with its absmax (itself 8-bit quantised under double quantisation). The forward pass dequantises W into its compute
dtype and multiplies (`dequantize_4bit`, then a plain product): that dequantised matrix is what is read here, a
block of rows or columns at a time with bitsandbytes' own `dequantize_4bit` on the slice. On a CPU with AVX512-BF16
bitsandbytes would instead repack the weights at the first forward for a fused kernel that rounds the activations
to bfloat16 whatever the model's dtype; `exact_forward` keeps such a layer on the dequantise-and-multiply path so
that the layer is the linear map of its dequantised weights (a layer already repacked is refused, with the way out).

8-bit: W = CB · SCB / 127, int8 codes with one scale per output row. The forward pass also rounds the activations
to int8 (outlier columns above the threshold stay in float16): no matrix reproduces that, so what the layer adds
beyond Σ coefficient · vector is carried as the quantisation residual (`scoring/quantization.py`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ...errors import UserError
from .matrix import QuantizedReader, aligned


def _bnb():
    import bitsandbytes

    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module.weight, "quant_state")


def is_8bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


class FourBitReader(QuantizedReader):
    method = "bnb-4bit"

    def __init__(self, module: nn.Module, name: str):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise UserError(f"{name} was repacked by bitsandbytes for its fused CPU kernel, which rounds activations "
                            "to bfloat16; load the model with load_model(..., quantization='bnb-4bit') (CLI: "
                            "--quantization bnb-4bit), or wrap it before its first forward pass")
        self.module, self.state = module, state
        self.shape = (int(state.shape[0]), int(state.shape[1]))
        self.device = module.weight.device
        self.blocksize = int(state.blocksize)
        self.method = f"bnb-4bit ({state.quant_type}{', double quantisation' if state.nested else ''})"
        # Slices of whole rows (columns) are whole blocks when a row's length is a multiple of the block.
        self.by_slices = self.shape[1] % self.blocksize == 0 and self.blocksize % 2 == 0
        self.row_block = 1
        self.column_block = self.blocksize

    @property
    def dtype(self) -> torch.dtype:
        """What the forward pass dequantises into: the layer's compute dtype (set from the first input where
        loading left it unset), else the dtype the weight was quantized from."""
        return self.module.compute_dtype or self.state.dtype

    def _absmax(self) -> Tensor:
        """Every block's absmax in float32 (a few bytes per block: small beside the codes)."""
        state = self.state
        if not state.nested:
            return state.absmax.float()
        return _bnb().functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset

    def _dequantise(self, codes: Tensor, absmax: Tensor, shape: tuple[int, int]) -> Tensor:
        functional = _bnb().functional
        state = functional.QuantState(absmax=absmax.contiguous(), shape=torch.Size(shape), code=self.state.code,
                                      blocksize=self.blocksize, quant_type=self.state.quant_type, dtype=self.dtype)
        # As bitsandbytes stores them, one column of bytes (it reads a single row of codes as transposed).
        return functional.dequantize_4bit(codes.contiguous().reshape(-1, 1), state).float()

    def _codes(self) -> Tensor:
        return self.module.weight.data.reshape(-1).view(torch.uint8)

    def _whole(self) -> Tensor:
        return self._dequantise(self._codes(), self._absmax(), self.shape)

    def rows(self, start: int, stop: int) -> Tensor:
        if not self.by_slices:
            return self._whole()[start:stop]
        out, width = self.shape
        codes = self._codes().reshape(out, width // 2)[start:stop]
        absmax = self._absmax().reshape(out, width // self.blocksize)[start:stop]
        return self._dequantise(codes, absmax.reshape(-1), (stop - start, width))

    def columns(self, start: int, stop: int) -> Tensor:
        if not self.by_slices:
            return self._whole()[:, start:stop]
        out, width = self.shape
        first, last = aligned(start, stop, self.blocksize, width)
        codes = self._codes().reshape(out, width // 2)[:, first // 2: last // 2]
        blocks = slice(first // self.blocksize, last // self.blocksize)
        absmax = self._absmax().reshape(out, width // self.blocksize)[:, blocks]
        block = self._dequantise(codes, absmax.reshape(-1), (out, last - first))
        return block[:, start - first: stop - first]


class EightBitReader(QuantizedReader):
    method = "bnb-8bit"

    def __init__(self, module: nn.Module, name: str):
        weight = module.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(module.state, "SCB", None)
        if scales is None or weight.dtype != torch.int8:
            raise UserError(f"{name}: a bitsandbytes 8-bit layer without int8 weights and their scales "
                            "(has_fp16_weights=True is not an inference model); load it for inference")
        self.codes, self.scales = weight.data, scales
        self.shape = tuple(int(n) for n in weight.shape)
        self.device = weight.device

    def rows(self, start: int, stop: int) -> Tensor:
        return _bnb().functional.int8_vectorwise_dequant(self.codes[start:stop], self.scales[start:stop]).float()

    def columns(self, start: int, stop: int) -> Tensor:
        codes = self.codes[:, start:stop].contiguous()
        return _bnb().functional.int8_vectorwise_dequant(codes, self.scales).float()


def exact_forward(model: nn.Module) -> None:
    """Keep every 4-bit layer on bitsandbytes' dequantise-and-multiply path (see the module's docstring): on a CPU
    with AVX512-BF16 bitsandbytes would otherwise repack the weights for a kernel that rounds activations to
    bfloat16. GPUs are untouched. An 8-bit model's warning at every forward pass that its activations are cast to
    float16 is dropped: the quantisation residual reports what that rounding does."""
    eight_bit = False
    for module in model.modules():
        if is_4bit(module) and module.weight.device.type == "cpu" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        eight_bit = eight_bit or is_8bit(module)
    if eight_bit:
        logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _CastWarningFilter) for f in logger.filters):
            logger.addFilter(_CastWarningFilter())


class _CastWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()
