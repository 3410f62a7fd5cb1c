"""The quantisation residual: what a sublayer added to the residual stream beyond the sum of its neurons.

Each sublayer's output at the last position is Σ coefficient · vector over its neurons, plus its bias. For a
layer whose forward pass is a linear map of its (dequantised) weights that holds to float32 rounding; a layer that
also rounds its activations inside the product (bitsandbytes' LLM.int8: int8 activations, float16 outliers)
adds a little more or less. That difference is a component of the decomposition in its own right: it is reported
per sublayer with its size and scored like a neuron, never absorbed in a tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .context import ValueContext
from .exact import Rows, score_rows
from .value import head_outputs


@dataclass(frozen=True)
class SublayerBiases:
    """A layer's attention-output and FFN-output biases, float32 (d,) or None."""

    attention: Tensor | None
    ffn: Tensor | None


@dataclass(frozen=True)
class ResidualVectors:
    attention: Tensor  # (L, d) at the last position
    ffn: Tensor  # (L, d)
    attention_outputs: Tensor  # (L, d): the sublayers' outputs they are part of
    ffn_outputs: Tensor


def residual_vectors(ctx: ValueContext, biases: list[SublayerBiases]) -> ResidualVectors:
    """Each sublayer's output at the last position less its neurons' vectors and its bias, as they reach the
    residual (through a post-norm's gain and frozen scale, and the residual multiplier, as the neurons do)."""
    trace, n_layers = ctx.trace, ctx.shape.n_layers
    attention_scales = trace.attention_scale_at_last()
    ffn_scales = None if trace.ffn_output_scales is None else trace.ffn_output_scales[:, -1]
    attention, ffn = [], []
    for layer in range(n_layers):
        heads = head_outputs(ctx, layer, None, ctx.attention_coefficients.summed[layer].unsqueeze(0))[0]
        neurons = ctx.ffn_values.combine(layer, ctx.ffn_coefficients[layer].unsqueeze(0))[0]
        attention.append(trace.attention_outputs[layer, -1] - heads - _bias_part(
            biases[layer].attention, ctx.output_weights.layers[layer].gain, attention_scales, layer))
        ffn.append(trace.ffn_outputs[layer, -1] - neurons - _bias_part(
            biases[layer].ffn, ctx.ffn_values.layers[layer].gain, ffn_scales, layer))
    return ResidualVectors(torch.stack(attention), torch.stack(ffn), trace.attention_outputs[:, -1],
                           trace.ffn_outputs[:, -1])


def _bias_part(bias: Tensor | None, gain: Tensor | None, scales: Tensor | None, layer: int) -> Tensor | float:
    if bias is None:
        return 0.0
    part = bias if gain is None else bias * gain.to(bias.device)
    return part if scales is None else part * scales[layer]


def residual_scores(ctx: ValueContext, vectors: ResidualVectors) -> tuple[Tensor, Tensor]:
    """(attention, ffn) per layer: each residual vector scored like a neuron's (added to the base its sublayer's
    neurons are scored from)."""
    layers = torch.arange(ctx.shape.n_layers, device=ctx.device)
    attention, ffn = score_rows(ctx, [Rows(2 * layers, vectors.attention), Rows(2 * layers + 1, vectors.ffn)],
                                reported=False)
    return attention.scores, ffn.scores
