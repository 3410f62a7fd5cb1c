"""Query neurons and query layers (METHOD.md §3): which earlier components switch the value neurons on.

A value neuron fires because the residual entering its sublayer has a large inner product with its subkey K
(scaled by the gain γ of the norm before that sublayer: K' = K ⊙ γ). The residual is an exact sum of earlier
components u, so each gets the share (u·K' / h·K') of the value neuron's score I. Non-linearities and the
norm's centring and scale are shared by all components and ignored, as in the paper.

Subkeys: an attention value neuron (l, j, n, p) reads row n of KV head j // (H / H_kv) of the value
projection, at its source position p. An FFN value neuron (l, k) reads its key (GELU) or its gate and up rows
(SwiGLU, scored separately), at the last position. Everything is float32 math on a trace and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import LayerWeights, ModelShape
from ..trace import Trace

# |h·K'| below this fraction of ‖h‖·‖K'‖ (a cosine under 1e-4) is treated as zero: dividing by it would give
# arbitrarily large shares with arbitrary signs. Such (value neuron, subkey) pairs are skipped and reported.
NEAR_ZERO_COSINE = 1e-4


@dataclass(frozen=True)
class AttentionValueNeuron:
    layer: int
    head: int
    dim: int
    position: int
    score: float


@dataclass(frozen=True)
class FfnValueNeuron:
    layer: int
    neuron: int
    score: float


@dataclass(frozen=True)
class SubkeyReading:
    """One (value neuron, subkey) pair: what it reads, where, and how much score it distributes."""

    subkey_name: str  # "value" for attention value neurons; "key", "gate" or "up" for FFN value neurons
    layer: int  # the value neuron's layer
    position: int  # where its input is read
    scaled_subkey: Tensor  # K' = K ⊙ γ, (d,)
    input: Tensor  # h: the full residual its sublayer reads, (d,)
    score: float  # I, the value neuron's score
    reads_same_layer_attention: bool  # FFN value neurons also see their own layer's attention output
    label: str  # for reporting skipped pairs

    @property
    def denominator(self) -> float:
        return float(self.input @ self.scaled_subkey)

    def is_degenerate(self) -> bool:
        scale = float(self.input.norm() * self.scaled_subkey.norm())
        return abs(self.denominator) <= NEAR_ZERO_COSINE * scale


def attention_readings(trace: Trace, weights: list[LayerWeights], shape: ModelShape,
                       neurons: list[AttentionValueNeuron]) -> list[SubkeyReading]:
    readings = []
    for n in neurons:
        w = weights[n.layer]
        kv_head = shape.kv_head_of(n.head)
        readings.append(SubkeyReading(
            "value", n.layer, n.position, w.value_weight[kv_head, n.dim] * w.attention_norm.weight,
            trace.layer_inputs[n.layer, n.position], n.score, False,
            f"attention {n.layer}_{n.head}_{n.dim}@{n.position}"))
    return readings


def ffn_readings(trace: Trace, weights: list[LayerWeights], neurons: list[FfnValueNeuron]) -> list[SubkeyReading]:
    readings = []
    last = trace.n_tokens - 1
    for n in neurons:
        w = weights[n.layer]
        middle = trace.layer_inputs[n.layer, last] + trace.attention_outputs[n.layer, last]
        for name, subkeys in w.ffn_subkeys.items():
            readings.append(SubkeyReading(
                name, n.layer, last, subkeys[n.neuron] * w.ffn_norm.weight, middle, n.score, True,
                f"ffn {n.layer}_{n.neuron} ({name})"))
    return readings


def usable(readings: list[SubkeyReading]) -> tuple[list[SubkeyReading], list[str]]:
    """Readings with a usable denominator, and labels of the ones skipped for a near-zero one."""
    kept = [r for r in readings if not r.is_degenerate()]
    skipped = [r.label for r in readings if r.is_degenerate()]
    return kept, skipped


def query_ffn_scores(trace: Trace, ffn_values: Tensor, readings: list[SubkeyReading]) -> dict[str, Tensor]:
    """(L, N) query scores of every FFN neuron, per subkey name: Σ over readings of
    (m_{p,k}^i · fc2_k^i) · K' / (h·K') · I, over the layers i below the value neuron's layer."""
    n_layers, n_neurons, _ = ffn_values.shape
    totals: dict[str, Tensor] = {}
    if not readings:
        return totals
    keys = torch.stack([r.scaled_subkey for r in readings])  # (R, d)
    slopes = torch.einsum("ind,rd->rin", ffn_values, keys)  # fc2 · K' for every neuron and reading
    positions = torch.tensor([r.position for r in readings])
    coefficients = trace.ffn_coefficients[:, positions].permute(1, 0, 2)  # (R, L, N)
    below = torch.arange(n_layers).unsqueeze(0) < torch.tensor([r.layer for r in readings]).unsqueeze(1)
    weight = torch.tensor([r.score / r.denominator for r in readings])
    shares = coefficients * slopes * (below.unsqueeze(-1) * weight[:, None, None])
    for index, reading in enumerate(readings):
        totals.setdefault(reading.subkey_name, torch.zeros(n_layers, n_neurons)).add_(shares[index])
    return totals


@dataclass
class LayerShares:
    """Query-layer scores: how much each earlier component activates the value neurons."""

    embedding: float
    attention: Tensor  # (L,)
    ffn: Tensor  # (L,)


def query_layer_scores(trace: Trace, readings: list[SubkeyReading]) -> dict[str, LayerShares]:
    """Per subkey name: Σ over readings of (u · K' / h·K') · I for each component u that makes up h."""
    n_layers = trace.n_layers
    result: dict[str, LayerShares] = {}
    for r in readings:
        weight = r.score / r.denominator
        p = r.position
        attention = (trace.attention_outputs[:, p] @ r.scaled_subkey) * weight
        ffn = (trace.ffn_outputs[:, p] @ r.scaled_subkey) * weight
        attention_layers = torch.arange(n_layers) <= r.layer if r.reads_same_layer_attention \
            else torch.arange(n_layers) < r.layer
        attention = attention * attention_layers
        ffn = ffn * (torch.arange(n_layers) < r.layer)
        embedding = float(trace.layer_inputs[0, p] @ r.scaled_subkey) * weight
        shares = result.setdefault(r.subkey_name, LayerShares(0.0, torch.zeros(n_layers), torch.zeros(n_layers)))
        shares.embedding += embedding
        shares.attention += attention
        shares.ffn += ffn
    return result


def interpret_through_head(weights: LayerWeights, shape: ModelShape, vector: Tensor, head: int) -> Tensor:
    """A (query) neuron's vector as the head would carry it: through the layer's input norm (own scale,
    gain, no bias), the head's value projection (its KV head) and output projection. Returns a (d,) vector."""
    norm = weights.attention_norm
    if norm.kind == "layernorm":
        centred = vector - vector.mean()
        normed = centred * torch.rsqrt(centred.pow(2).mean() + norm.eps)
    else:
        normed = vector * torch.rsqrt(vector.pow(2).mean() + norm.eps)
    normed = normed * norm.weight
    value = weights.value_weight[shape.kv_head_of(head)] @ normed  # (d_h,)
    return value @ weights.output_weight[head]  # (d,)
