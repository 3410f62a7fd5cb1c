"""The inputs of a node of the circuit (docs/method.md §3b): what fraction of what a neuron passes on comes from each
earlier neuron, token embedding, or neither (the biases and whatever the graph leaves out).

A node reads a residual r at a position p: an FFN neuron (l, k) at p reads h_p^{l-1} (+ A_p^l in a sequential
block) through its subkeys; an attention neuron (l, j, n, s) reads h_s^{l-1} through its value row. r is an exact
sum of components — the token embedding at p, every FFN neuron m_{p,k}·fc2_k of a layer below, every attention
neuron α_{p,j,s'}·v_{s',n}·W_O[j,n] of a layer below writing to query p, and the biases — so component u gets the
fraction Σ_keys w_key · (u·K') / (Σ_u u·K') of the node's flow (the same shares as query neurons, §3; gated neurons
split once between gate and up by elasticity). The fractions over all components add up to 1. Float32 dot
products over float64 denominators; everything is math on a trace, its attention rows and the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.adapters import LayerWeights
from ..model.trace import Trace
from ..model.weights import LayerStack
from ..neurons import ModelShape
from .query import swiglu_split


@dataclass(frozen=True)
class CircuitInputs:
    """What the fractions are read from: a trace keeping every position, every query's attention rows
    (L, H, T, T), the layers' weights and the residual directions of FFN and attention neurons."""

    trace: Trace
    attention_rows: Tensor
    weights: list[LayerWeights]
    ffn_values: LayerStack
    output_values: LayerStack
    shape: ModelShape
    parallel: bool
    activation: Callable[[int], Callable[[Tensor], Tensor]]


@dataclass
class Fractions:
    """The fractions of one node's flow per component: FFN neurons (L, N) at the position it reads, attention
    neurons (L, H, d_h, T) by source position, the token embedding, and what is left (the biases)."""

    ffn: Tensor
    attention: Tensor
    token: float

    @property
    def rest(self) -> float:
        return 1.0 - float(self.ffn.sum()) - float(self.attention.sum()) - self.token


def ffn_fractions(inputs: CircuitInputs, layer: int, row: int, position: int) -> Fractions:
    """The inputs of FFN neuron `row` (the layer's flat layout) of `layer` at `position`."""
    trace, w = inputs.trace, inputs.weights[layer]
    slot = trace.slots(position)
    own = not inputs.parallel
    reading = trace.layer_inputs[layer, slot] + (trace.attention_outputs[layer, slot] if own else 0)
    keys = {name: subkeys[row].to(device=reading.device, dtype=torch.float32) * w.ffn_norm.weight
            for name, subkeys in w.ffn_subkeys.items()}
    split = {"key": 1.0}
    if "gate" in keys:
        gate_input = (w.ffn_subkeys["gate"][row].to(reading.device, torch.float64)
                      @ w.ffn_norm.apply(reading.double()))
        gate, up = swiglu_split(inputs.activation(layer), gate_input.reshape(1))
        split = {"gate": float(gate[0]), "up": float(up[0])}
        if split["gate"] != split["gate"]:  # NaN: undefined split, the flow stays unexplained
            split = {"gate": 0.0, "up": 0.0}
    return _fractions(inputs, layer, position, own, [(keys[name], split[name]) for name in keys])


def attention_fractions(inputs: CircuitInputs, layer: int, head: int, dim: int, source: int) -> Fractions:
    """The inputs of attention neuron (layer, head, dim) at its source position: its value row reads there."""
    w = inputs.weights[layer]
    key = w.value_weight[inputs.shape.kv_head_of(head), dim].to(w.attention_norm.weight.device, torch.float32)
    return _fractions(inputs, layer, source, False, [(key * w.attention_norm.weight, 1.0)])


def _fractions(inputs: CircuitInputs, layer: int, position: int, own_attention: bool,
               keys: list[tuple[Tensor, float]]) -> Fractions:
    trace, shape = inputs.trace, inputs.shape
    slot = trace.slots(position)
    n_layers, device = shape.n_layers, inputs.ffn_values.device
    layers = torch.arange(n_layers, device=device)
    ffn_mask = (layers < layer).unsqueeze(1)
    attention_mask = ((layers < layer) | (own_attention & (layers == layer))).reshape(-1, 1, 1, 1)
    coefficients = trace.ffn_residual_coefficients(position).to(device)  # (L, N)
    alpha = inputs.attention_rows[:, :, position, :].to(device)  # (L, H, T): query `position`'s rows
    kv = torch.tensor([shape.kv_head_of(h) for h in range(shape.n_heads)], device=device)
    values = trace.value_states.to(device)[:, :, kv, :].permute(0, 2, 3, 1)  # (L, H, d_h, T)
    scales = trace.attention_output_scales
    scale = torch.ones(n_layers, device=device) if scales is None else scales[:, slot].to(device)
    components = _parts_sum(trace, layer, slot, own_attention)
    ffn = torch.zeros(n_layers, shape.d_ffn, dtype=torch.float64, device=device)
    attention = torch.zeros(n_layers, shape.n_heads, shape.head_dim, trace.n_tokens, dtype=torch.float64,
                            device=device)
    token = 0.0
    for key, weight in keys:
        if weight == 0.0:
            continue
        key = key.to(device)
        denominator = float(components @ key.double())
        share = weight / denominator
        directions = key.unsqueeze(0).expand(n_layers, -1)
        ffn += (coefficients * inputs.ffn_values.dots(directions) * ffn_mask).double() * share
        outputs = inputs.output_values.dots(directions).reshape(n_layers, shape.n_heads, shape.head_dim)
        per_source = outputs.unsqueeze(-1) * alpha.unsqueeze(2) * values * scale.reshape(-1, 1, 1, 1)
        attention += (per_source * attention_mask).double() * share
        token += float(trace.layer_inputs[0, slot].double() @ key.double()) * share
    return Fractions(ffn, attention, token)


def _parts_sum(trace: Trace, layer: int, slot, own_attention: bool) -> Tensor:
    top = layer + 1 if own_attention else layer
    return (trace.layer_inputs[0, slot].double() + trace.attention_outputs[:top, slot].double().sum(0)
            + trace.ffn_outputs[:layer, slot].double().sum(0))
