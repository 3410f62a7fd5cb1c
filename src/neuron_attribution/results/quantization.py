"""A quantized model's quantisation residuals, the decomposition's component beside the neurons."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QuantizationResidual:
    """What one sublayer of a quantized model added at the last position beyond its neurons and bias
    (`scoring/quantization.py`): non-zero where the layer rounds its activations inside the product
    (bitsandbytes 8-bit). `norm` is its length, `relative` that over the sublayer output's length, `score` its
    log-probability increase scored like a neuron's."""

    layer: int
    component: str  # "attention" or "ffn"
    norm: float
    relative: float
    score: float
