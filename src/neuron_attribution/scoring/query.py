"""Query neurons and query layers (docs/method.md §3): which earlier components switch the value neurons on.

A value neuron fires because the residual entering its sublayer has a large inner product with its subkey K
(scaled by the gain γ of the norm before that sublayer: K' = K ⊙ γ). The residual is an exact sum of earlier
components u, so each gets the share (u·K' / h·K') of the value neuron's score I. Non-linearities and the
norm's centring and scale are shared by all components and ignored, as in the paper.

Subkeys: an attention value neuron (l, j, n, p) reads row n of KV head j // (H / H_kv) of the value
projection, at its source position p. An FFN value neuron (l, k) reads its key (GELU) or its gate and up rows
(SwiGLU: its score split between them once, by elasticity), at the last position. Everything is float32 math
on a trace and weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..model.adapters import LayerWeights
from ..model.trace import Trace
from ..model.weights import LayerStack
from ..neurons import ModelShape

# |h·K'| below this fraction of ‖h‖·‖K'‖ (a cosine under 1e-4) is treated as zero: dividing by it would give
# arbitrarily large shares with arbitrary signs. Such (value neuron, subkey) pairs are skipped and reported.
# A model that runs in a coarser dtype rounds every component it adds to the residual, so there the threshold is
# the dtype's own resolution (`near_zero_cosine`): a cosine below it has no sign the recorded values can tell.
NEAR_ZERO_COSINE = 1e-4


def near_zero_cosine(dtype: torch.dtype) -> float:
    """The cosine under which h·K' counts as zero for a model computing in `dtype` (bfloat16: 2⁻⁷)."""
    return max(NEAR_ZERO_COSINE, torch.finfo(dtype).eps)


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
    row: int  # in the layer's flat layout (a mixture of experts: the experts' rows, then the shared expert's)
    score: float
    name: str = ""  # as the results write it; default layer_row

    @property
    def label(self) -> str:
        return self.name or f"{self.layer}_{self.row}"


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
    value_neuron: str = ""  # the value neuron as text ("23_4_38@3", "27_846"): the query links' target
    # Σu: the components the shares are handed to, added up in float64. In float32 it equals `input`; a bfloat16
    # residual is rounded at every addition and is not the sum of its recorded parts (None: `input`).
    parts_sum: Tensor | None = None

    @cached_property
    def denominator(self) -> float:
        """Σ_u u·K' over the components the shares go to, so that the shares add up to the score in every
        dtype (docs/method.md §3)."""
        if self.parts_sum is None:
            return float(self.input @ self.scaled_subkey)
        return float(self.parts_sum @ self.scaled_subkey.double())

    def is_degenerate(self, near_zero: float = NEAR_ZERO_COSINE) -> bool:
        scale = float(self.input.norm() * self.scaled_subkey.norm())
        return abs(self.denominator) <= near_zero * scale


def attention_readings(trace: Trace, weights: list[LayerWeights], shape: ModelShape,
                       neurons: list[AttentionValueNeuron]) -> list[SubkeyReading]:
    readings = []
    for n in neurons:
        w = weights[n.layer]
        kv_head = shape.kv_head_of(n.head)
        source = trace.layer_input(n.layer, n.position)
        subkey = _row(w.value_weight[kv_head, n.dim], source) * w.attention_norm.weight
        readings.append(SubkeyReading(
            "value", n.layer, n.position, subkey, source, n.score, False,
            f"attention {n.layer}_{n.head}_{n.dim}@{n.position}", f"{n.layer}_{n.head}_{n.dim}@{n.position}",
            sum_of_components(trace, n.layer, n.position, own_attention=False)))
    return readings


def sum_of_components(trace: Trace, layer: int, position: int, own_attention: bool) -> Tensor:
    """(d,): the embedding and every attention and FFN output below `layer` at `position` (and `layer`'s own
    attention output for a sequential FFN), added up: the residual as the decomposition has it. In float64, since
    large components that cancel (OLMo) would leave float32 rounding in the denominator."""
    slot = trace.slots(position)
    top = layer + 1 if own_attention else layer
    return (trace.layer_inputs[0, slot].double() + trace.attention_outputs[:top, slot].double().sum(0)
            + trace.ffn_outputs[:layer, slot].double().sum(0))


def ffn_readings(trace: Trace, weights: list[LayerWeights], neurons: list[FfnValueNeuron],
                 parallel: bool = False, activation: Callable[[int], Callable[[Tensor], Tensor]] | None = None
                 ) -> tuple[list[SubkeyReading], list[str]]:
    """Readings of the FFN value neurons' subkeys, and labels of the neurons left out.

    In a sequential block the FFN reads h^{l-1} + A^l; in a parallel block, h^{l-1} alone (its own layer's
    attention output is not among its components). A gated neuron (gate and up subkeys) hands out its score
    once: split between the two paths by their elasticities (`swiglu_split`); `activation(layer)` is the gate's
    activation function. A neuron whose two elasticities cancel is left out and reported."""
    readings, skipped = [], []
    last = trace.n_tokens - 1
    inputs = trace.ffn_inputs(last, parallel)
    bases = [inputs[n.layer] for n in neurons]
    splits = _gate_up_splits(weights, neurons, bases, activation)
    for n, middle, split in zip(neurons, bases, splits):
        w = weights[n.layer]
        if split is None:
            skipped.append(f"ffn {n.label} (gate and up elasticities cancel)")
            continue
        parts = sum_of_components(trace, n.layer, last, own_attention=not parallel)
        for name, subkeys in w.ffn_subkeys.items():
            readings.append(SubkeyReading(
                name, n.layer, last, _row(subkeys[n.row], middle) * w.ffn_norm.weight, middle,
                n.score * split[name],
                not parallel, f"ffn {n.label} ({name})", n.label, parts))
    return readings, skipped


def _gate_up_splits(weights: list[LayerWeights], neurons: list[FfnValueNeuron], bases: list[Tensor],
                    activation: Callable[[int], Callable[[Tensor], Tensor]] | None) -> list[dict[str, float] | None]:
    """Per neuron, the share of each subkey: 1 for a GELU key; the elasticity split for gate and up."""
    if not neurons or "gate" not in weights[neurons[0].layer].ffn_subkeys:
        return [{name: 1.0 for name in weights[n.layer].ffn_subkeys} for n in neurons]
    # float64 (a d-sized dot per neuron): the split is sensitive where e_gate nears −1
    gate_inputs = torch.stack([_row(weights[n.layer].ffn_subkeys["gate"][n.row], middle).double()
                               @ weights[n.layer].ffn_norm.apply(middle.double())
                               for n, middle in zip(neurons, bases)])
    by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(neurons):
        by_layer.setdefault(n.layer, []).append(i)
    splits: list[dict[str, float] | None] = [None] * len(neurons)
    for layer, rows in by_layer.items():  # one activation module per layer (they are all the same kind)
        gate, up = swiglu_split(activation(layer), gate_inputs[rows])
        for i, g, u in zip(rows, gate.tolist(), up.tolist()):
            splits[i] = None if g != g else {"gate": g, "up": u}  # NaN: undefined split
    return splits


# |e_gate + e_up| below this: the split's weights e/(e_gate + e_up) would be arbitrarily large.
NEAR_ZERO_ELASTICITY = 1e-3


def swiglu_split(activation: Callable[[Tensor], Tensor], gate_input: Tensor) -> tuple[Tensor, Tensor]:
    """(w_gate, w_up) for each gate pre-activation g: how a gated neuron's score m = act(g)·u is shared between
    its gate and up paths (docs/method.md §3). Each path's share is its elasticity, the relative change of m per
    relative change of its input: e_up = 1, e_gate = g·act'(g)/act(g) (for SiLU, 1 + g(1 − σ(g))); w = e /
    (e_gate + e_up), so the two add up to 1. NaN where act(g) = 0 or the elasticities cancel."""
    with torch.inference_mode(False), torch.enable_grad():
        g = gate_input.detach().reshape(-1).to(torch.float64).clone().requires_grad_(True)
        value = activation(g)
        (slope,) = torch.autograd.grad(value.sum(), g)
    value, g = value.detach(), g.detach()
    elasticity = g * slope / value
    total = elasticity + 1.0
    undefined = (value == 0) | (total.abs() < NEAR_ZERO_ELASTICITY)
    nan = torch.full_like(total, float("nan"))
    return torch.where(undefined, nan, elasticity / total), torch.where(undefined, nan, 1.0 / total)


def usable(readings: list[SubkeyReading], near_zero: float = NEAR_ZERO_COSINE
           ) -> tuple[list[SubkeyReading], list[str]]:
    """Readings with a usable denominator, and labels of the ones skipped for a near-zero one (a cosine of h
    and K' at most `near_zero`: `near_zero_cosine` of the model's dtype)."""
    degenerate = [r.is_degenerate(near_zero) for r in readings]
    kept = [r for r, bad in zip(readings, degenerate) if not bad]
    skipped = [r.label for r, bad in zip(readings, degenerate) if bad]
    return kept, skipped


@dataclass(frozen=True)
class _Stacked:
    """Readings as tensors: subkeys (R, d), positions, value-neuron layers and weights I / h·K' (R,)."""

    keys: Tensor
    positions: Tensor
    layers: Tensor
    weights: Tensor

    @classmethod
    def of(cls, readings: list[SubkeyReading]) -> _Stacked:
        keys = torch.stack([r.scaled_subkey for r in readings])
        return cls(keys, torch.tensor([r.position for r in readings], device=keys.device),
                   torch.tensor([r.layer for r in readings], device=keys.device),
                   torch.tensor([r.score / r.denominator for r in readings], device=keys.device))


def _rows_by_name(readings: list[SubkeyReading], device: torch.device) -> dict[str, Tensor]:
    names = [r.subkey_name for r in readings]
    return {name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            for name in dict.fromkeys(names)}


def query_ffn_scores(trace: Trace, ffn_values: LayerStack, readings: list[SubkeyReading],
                     by_position: dict[int, Tensor] | None = None) -> dict[str, Tensor]:
    """(L, N) query scores of every FFN neuron, per subkey name: Σ over readings of
    (m_{p,k}^i · fc2_k^i) · K' / (h·K') · I, over the layers i below the value neuron's layer. `ffn_values` are
    the residual directions and the coefficients are taken as they weigh them (post-norm gain and scale).
    `by_position`, if given, receives the same scores split by the position p where they were read."""
    n_layers, n_neurons = ffn_values.n_layers, ffn_values.n_rows
    totals: dict[str, Tensor] = {}
    if not readings:
        return totals
    # The score is linear in the subkeys, so readings of one subkey kind at one position are merged first:
    # per layer i, Σ_r [i < l_r]·(I_r / h_r·K'_r)·K'_r. That leaves one (L·N·d) product per (kind, position)
    # instead of one per reading.
    stacked = _Stacked.of(readings)
    device = stacked.keys.device
    below = torch.arange(n_layers, device=device).unsqueeze(0) < stacked.layers.unsqueeze(1)
    weights = below * stacked.weights.unsqueeze(1)  # (R, L)
    groups = list(dict.fromkeys((r.subkey_name, r.position) for r in readings))
    membership = torch.tensor([[float((r.subkey_name, r.position) == g) for r in readings] for g in groups],
                              device=device)
    merged_keys = torch.einsum("gr,rl,rd->gld", membership, weights, stacked.keys)  # (G, L, d)
    positions = torch.tensor([position for _, position in groups], device=device)
    coefficients = trace.ffn_residual_coefficients(positions)  # (L, G, N)
    # Only neurons with a coefficient at a position read need their slopes (a mixture's chosen experts there).
    slopes = ffn_values.dots(merged_keys.permute(1, 0, 2), coefficients.ne(0).any(dim=1)).permute(1, 0, 2)
    shares = coefficients.permute(1, 0, 2) * slopes  # (G, L, N)
    for index, (name, position) in enumerate(groups):
        totals.setdefault(name, shares.new_zeros(n_layers, n_neurons)).add_(shares[index])
        if by_position is not None:
            by_position.setdefault(position, shares.new_zeros(n_layers, n_neurons)).add_(shares[index])
    return totals


def query_links(trace: Trace, ffn_values: LayerStack, readings: list[SubkeyReading], layers: Tensor,
                neurons: Tensor) -> Tensor:
    """(Q, R): the share of query FFN neuron q = (layers[q], neurons[q]) in each reading's value neuron, the
    terms `query_ffn_scores` sums over readings: m_{p_r, q} · (fc2_q · K'_r) · I_r / (h_r · K'_r), zero where
    the query neuron is not below the value neuron."""
    if not readings or not len(layers):
        return torch.zeros(len(layers), len(readings), device=ffn_values.device)
    stacked = _Stacked.of(readings)
    vectors = ffn_values.rows(layers, neurons)  # (Q, d)
    slopes = vectors @ stacked.keys.T  # (Q, R)
    coefficients = trace.ffn_residual_coefficients(stacked.positions)  # (L, R, N)
    reading = torch.arange(len(readings), device=coefficients.device)
    at = coefficients[layers.unsqueeze(1), reading.unsqueeze(0), neurons.unsqueeze(1)]  # (Q, R)
    below = layers.unsqueeze(1) < stacked.layers.unsqueeze(0)
    return at * slopes * stacked.weights.unsqueeze(0) * below


@dataclass
class LayerShares:
    """Query-layer scores: how much each earlier component activates the value neurons."""

    embedding: float
    attention: Tensor  # (L,)
    ffn: Tensor  # (L,)


def query_layer_scores(trace: Trace, readings: list[SubkeyReading]) -> dict[str, LayerShares]:
    """Per subkey name: Σ over readings of (u · K' / h·K') · I for each component u that makes up h."""
    if not readings:
        return {}
    n_layers = trace.n_layers
    stacked = _Stacked.of(readings)
    # float64: a few (L, R, d) dot products, where large components that cancel (OLMo) would leave float32 rounding
    keys, positions, weight = stacked.keys.double(), stacked.positions, stacked.weights.double().unsqueeze(1)
    layers = torch.arange(n_layers, device=keys.device).unsqueeze(0)
    value_layer = stacked.layers.unsqueeze(1)
    own = torch.tensor([r.reads_same_layer_attention for r in readings], device=keys.device).unsqueeze(1)
    attention_mask = (layers < value_layer) | (own & (layers == value_layer))
    slots = trace.slots(positions)
    attention = torch.einsum("lrd,rd->rl", trace.attention_outputs[:, slots].double(), keys) * weight * attention_mask
    ffn = torch.einsum("lrd,rd->rl", trace.ffn_outputs[:, slots].double(), keys) * weight * (layers < value_layer)
    embedding = (trace.layer_inputs[0, slots].double() * keys).sum(-1) * weight.squeeze(1)
    return {name: LayerShares(float(embedding[rows].sum()), attention[rows].sum(0), ffn[rows].sum(0))
            for name, rows in _rows_by_name(readings, keys.device).items()}


def interpret_through_head(weights: LayerWeights, shape: ModelShape, vector: Tensor, head: int) -> Tensor:
    """A (query) neuron's vector as the head would carry it: through the layer's input norm (own scale,
    gain, no bias), the head's value projection (its KV head) and output projection. Returns a (d,) vector."""
    normed = weights.attention_norm.apply_without_bias(vector)
    value = _row(weights.value_weight[shape.kv_head_of(head)], normed) @ normed  # (d_h,)
    return value @ _row(weights.output_weight[head], normed)  # (d,)


def _row(weight: Tensor, like: Tensor) -> Tensor:
    """A slice of a weight matrix (as the model holds it) as float32, on `like`'s device."""
    return weight.to(device=like.device, dtype=torch.float32)
