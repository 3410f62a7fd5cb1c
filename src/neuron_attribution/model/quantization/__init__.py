"""Quantized models: loading them (`methods`) and reading a quantized layer's weights exactly as its forward pass
uses them (`matrix`, one reader per method: `bitsandbytes`, `torchao`; `compressed_tensors` checkpoints run
decompressed)."""

from __future__ import annotations

from torch import Tensor, nn

from ...errors import UserError
from . import bitsandbytes, compressed_tensors, torchao
from .matrix import DequantisedMatrix, QuantizedReader


def reader_for(module: nn.Module, name: str = "") -> QuantizedReader | None:
    """The reader of a quantized linear layer; None for a plain one."""
    if bitsandbytes.is_4bit(module):
        return bitsandbytes.FourBitReader(module, name or type(module).__name__)
    if bitsandbytes.is_8bit(module):
        return bitsandbytes.EightBitReader(module, name or type(module).__name__)
    if torchao.is_torchao(module):
        return torchao.TorchAoReader(module, name or type(module).__name__)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and not weight.is_floating_point():
        raise UserError(f"{name or type(module).__name__} ({type(module).__name__}) holds {weight.dtype} weights "
                        "of a quantisation this tool cannot read; supported: bitsandbytes 4-bit and 8-bit, torchao")
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether the model is quantized: layers of a method read here, or a compressed-tensors checkpoint (run
    decompressed, but possibly rounding its activations)."""
    return compressed_tensors.is_compressed_tensors(model) or any(
        bitsandbytes.is_4bit(m) or bitsandbytes.is_8bit(m) or torchao.is_torchao(m) for m in model.modules())


def prepare_for_reading(model: nn.Module) -> None:
    """Before the first forward pass: 4-bit layers kept on the dequantise-and-multiply path, a compressed-tensors
    model decompressed (see those modules)."""
    bitsandbytes.exact_forward(model)
    compressed_tensors.decompress(model)


def weight_of(module: nn.Module, name: str = "") -> Tensor | DequantisedMatrix:
    """A linear layer's (out, in) weight: the parameter itself (detached, a view) or, for a quantized layer, its
    effective matrix read a block at a time."""
    reader = reader_for(module, name)
    return module.weight.detach() if reader is None else DequantisedMatrix(reader)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedReader]:
    """Every quantized linear layer of the model, by name."""
    found = {}
    for name, module in model.named_modules():
        reader = reader_for(module, name) if hasattr(module, "weight") else None
        if reader is not None:
            found[name] = reader
    return found


__all__ = ["DequantisedMatrix", "QuantizedReader", "has_quantized_layers", "prepare_for_reading", "quantized_layers",
           "reader_for", "weight_of"]
