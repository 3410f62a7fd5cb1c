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
from .query import sum_of_components, swiglu_split


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


@dataclass(frozen=True)
class Reader:
    """How a node reads the residual: at `position`, the components below `layer` (and `layer`'s own attention
    output for a sequential FFN), through each key K' with the weight its share of the flow gets."""

    layer: int
    position: int
    own_attention: bool
    keys: tuple[tuple[Tensor, float], ...]


def ffn_reader(inputs: CircuitInputs, layer: int, row: int, position: int) -> Reader:
    """FFN neuron `row` (the layer's flat layout) of `layer` at `position`: its subkeys, gate and up split once by
    elasticity (docs/method.md §3); an undefined split passes nothing on (the flow stays unexplained)."""
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
        if split["gate"] != split["gate"]:  # NaN
            split = {"gate": 0.0, "up": 0.0}
    return Reader(layer, position, own, tuple((keys[name], split[name]) for name in keys))


def attention_reader(inputs: CircuitInputs, layer: int, head: int, dim: int, source: int) -> Reader:
    """Attention neuron (layer, head, dim) at its source position: its value row reads there."""
    w = inputs.weights[layer]
    key = w.value_weight[inputs.shape.kv_head_of(head), dim].to(w.attention_norm.weight.device, torch.float32)
    return Reader(layer, source, False, ((key * w.attention_norm.weight, 1.0),))


def fractions(inputs: CircuitInputs, readers: list[Reader]) -> list[Fractions]:
    """Each reader's fractions. Readers at one position share one product of every layer's residual directions
    with all their keys (matrix products, not one vector product per node)."""
    by_position: dict[int, list[int]] = {}
    for i, reader in enumerate(readers):
        by_position.setdefault(reader.position, []).append(i)
    result: list[Fractions | None] = [None] * len(readers)
    for position, members in by_position.items():
        for i, found in zip(members, _at_position(inputs, position, [readers[i] for i in members])):
            result[i] = found
    return result  # type: ignore[return-value]


def _at_position(inputs: CircuitInputs, position: int, readers: list[Reader]) -> list[Fractions]:
    trace, shape = inputs.trace, inputs.shape
    slot = trace.slots(position)
    n_layers, device = shape.n_layers, inputs.ffn_values.device
    keys = torch.stack([key.to(device) for reader in readers for key, _ in reader.keys])  # (G, d)
    below = max(reader.layer for reader in readers) + 1  # no reader here reads a layer above its own
    ffn_dots = _dots(inputs.ffn_values, keys, below, shape.d_ffn)  # (L, G, N)
    output_dots = _dots(inputs.output_values, keys, below, shape.n_heads * shape.head_dim).reshape(
        n_layers, len(keys), shape.n_heads, shape.head_dim)
    coefficients = trace.ffn_residual_coefficients(position).to(device)  # (L, N)
    alpha = inputs.attention_rows[:, :, position, :].to(device)  # (L, H, T): query `position`'s rows
    kv = torch.tensor([shape.kv_head_of(h) for h in range(shape.n_heads)], device=device)
    values = trace.value_states.to(device)[:, :, kv, :].permute(0, 2, 3, 1)  # (L, H, d_h, T)
    scales = trace.attention_output_scales
    scale = torch.ones(n_layers, device=device) if scales is None else scales[:, slot].to(device)
    reached = alpha.unsqueeze(2) * values * scale.reshape(-1, 1, 1, 1)  # (L, H, d_h, T): α·v (·s)
    embedding = trace.layer_inputs[0, slot].double()
    layers = torch.arange(n_layers, device=device)
    found, g = [], 0
    for reader in readers:
        components = sum_of_components(trace, reader.layer, position, reader.own_attention)
        ffn_mask = (layers < reader.layer).unsqueeze(1)
        attention_mask = ((layers < reader.layer) | (reader.own_attention & (layers == reader.layer))
                          ).reshape(-1, 1, 1, 1)
        # float32 products (each weighed by a float64 share): the fractions of the kept inputs, and the rest of
        # every node's flow, are exact to float32's precision
        ffn = torch.zeros(n_layers, shape.d_ffn, device=device)
        attention = torch.zeros_like(reached)
        token = 0.0
        for key, weight in reader.keys:
            if weight != 0.0:
                share = weight / float(components @ key.to(device).double())
                ffn += coefficients * ffn_dots[:, g] * ffn_mask * share
                attention += output_dots[:, g].unsqueeze(-1) * reached * attention_mask * share
                token += float(embedding @ key.to(device).double()) * share
            g += 1
        found.append(Fractions(ffn, attention, token))
    return found


def _dots(stack: LayerStack, keys: Tensor, below: int, rows: int) -> Tensor:
    """(L, G, R): every row of each layer below `below` times each key; zeros above (never read)."""
    result = torch.zeros(stack.n_layers, len(keys), rows, device=keys.device)
    for layer, matrix in enumerate(stack.layers[:below]):
        result[layer] = matrix.times_transposed(keys)
    return result
