"""compressed-tensors checkpoints (pack-quantized int4, int-quantized int8, ... as LLM Compressor writes them).

transformers runs such a model decompressed: it loads the compressed tensors, then compressed-tensors'
`ModelCompressor.decompress_model` turns every quantized layer back into a dense weight in the model's dtype at
the first forward pass. That is done here when the model is wrapped instead, with the same decompressor, so that
the size `info` reports is the size the model runs in and no forward pass is the one that changes the weights.
The layers are then plain linear layers whose weights are the dequantised values; a scheme that also quantizes
activations rounds them inside the layer, which the quantisation residual reports."""

from __future__ import annotations

from torch import nn

from .methods import quantization_of


def is_compressed_tensors(model: nn.Module) -> bool:
    return quantization_of(model) == "compressed-tensors"


def decompress(model: nn.Module) -> None:
    """Decompress a model transformers left compressed until its first forward pass (nothing otherwise)."""
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is not None and hasattr(model, "ct_decompress_hook"):
        compressor.decompress_model(model)
