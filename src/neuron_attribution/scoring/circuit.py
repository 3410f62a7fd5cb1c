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
from ..model.weights import CHUNK_BYTES, LayerStack
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
class Inputs:
    """A node's strongest inputs: its token embedding's fraction, and the `count` other components with the
    largest fractions in magnitude — FFN neurons (layer, row) at the position it reads and attention neurons
    (layer, head·d_h + dim, source position) — with their fractions."""

    token: float
    ffn: list[tuple[int, int, float]]
    attention: list[tuple[int, int, int, float]]


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


def strongest_inputs(inputs: CircuitInputs, readers: list[Reader], count: int,
                     budget_bytes: int = CHUNK_BYTES) -> list[Inputs]:
    """Each reader's `count` strongest inputs. A fraction is linear in the component, so a reader's keys fold into
    one direction, Σ_key share·K'; the readers of a hop share one product of every layer's residual directions
    with all their directions, and the readers at one position one weighing of it (matrix products, not one
    vector product per node); `budget_bytes` bounds the products and fractions held at once."""
    shape = inputs.shape
    per_reader = 4 * shape.n_layers * (shape.d_ffn + shape.n_heads * shape.head_dim * (inputs.trace.n_tokens + 1))
    step = max(1, budget_bytes // per_reader)
    order = sorted(range(len(readers)), key=lambda i: readers[i].position)
    found: list[Inputs | None] = [None] * len(readers)
    for start in range(0, len(order), step):
        batch = order[start: start + step]
        for i, chosen in zip(batch, _strongest_in_batch(inputs, [readers[i] for i in batch], count)):
            found[i] = chosen
    return found  # type: ignore[return-value]


def _folded(inputs: CircuitInputs, reader: Reader, device: torch.device) -> tuple[Tensor, float]:
    """The reader's one direction Σ_key share·K' (share: the key's weight over what the key reads of the residual,
    float64) and its token embedding's fraction."""
    trace = inputs.trace
    components = sum_of_components(trace, reader.layer, reader.position, reader.own_attention).to(device)
    embedding = trace.layer_inputs[0, trace.slots(reader.position)].to(device).double()
    direction = torch.zeros(components.shape[0], dtype=torch.float64, device=device)
    for key, weight in reader.keys:
        if weight != 0.0:
            key = key.to(device).double()
            direction += key * (weight / float(components @ key))
    return direction.float(), float(embedding @ direction)


def _strongest_in_batch(inputs: CircuitInputs, members: list[Reader], count: int) -> list[Inputs]:
    shape = inputs.shape
    device = inputs.ffn_values.device
    folded = [_folded(inputs, reader, device) for reader in members]
    directions = torch.stack([direction for direction, _ in folded])  # (R, d)
    below = max(reader.layer for reader in members) + 1  # no reader reads a layer above its own
    ffn = _dots(inputs.ffn_values, directions, below, shape.d_ffn)  # (R, L, N)
    heads = _dots(inputs.output_values, directions, below, shape.n_heads * shape.head_dim)  # (R, L, H·d_h)
    at: dict[int, list[int]] = {}
    for r, reader in enumerate(members):
        at.setdefault(reader.position, []).append(r)
    found: list[Inputs | None] = [None] * len(members)
    for position, rows in at.items():
        chosen = _strongest_at(inputs, position, [members[r] for r in rows], ffn[rows], heads[rows], count)
        for r, (ffn_inputs, attention_inputs) in zip(rows, chosen):
            found[r] = Inputs(folded[r][1], ffn_inputs, attention_inputs)
    return found  # type: ignore[return-value]


def _strongest_at(inputs: CircuitInputs, position: int, readers: list[Reader], ffn_dots: Tensor, head_dots: Tensor,
                  count: int) -> list[tuple[list, list]]:
    """The fractions of every component for the readers at one position (their directions' products with the
    residual directions given), and each reader's `count` largest in magnitude."""
    trace, shape = inputs.trace, inputs.shape
    n_layers, n_tokens, device = shape.n_layers, trace.n_tokens, ffn_dots.device
    slot = trace.slots(position)
    coefficients = trace.ffn_residual_coefficients(position).to(device)  # (L, N)
    alpha = inputs.attention_rows[:, :, position, :].to(device)  # (L, H, T): query `position`'s rows
    kv = torch.tensor([shape.kv_head_of(h) for h in range(shape.n_heads)], device=device)
    values = trace.value_states.to(device)[:, :, kv, :].permute(0, 2, 3, 1)  # (L, H, d_h, T)
    scales = trace.attention_output_scales
    scale = torch.ones(n_layers, device=device) if scales is None else scales[:, slot].to(device)
    reached = alpha.unsqueeze(2) * values * scale.reshape(-1, 1, 1, 1)  # (L, H, d_h, T): α·v (·s)
    layers = torch.arange(n_layers, device=device)
    reader_layers = torch.tensor([reader.layer for reader in readers], device=device).unsqueeze(1)
    own = torch.tensor([reader.own_attention for reader in readers], device=device).unsqueeze(1)
    ffn_mask = layers < reader_layers  # (R, L)
    attention_mask = ffn_mask | (own & (layers == reader_layers))
    # float32 products with float64-derived directions: the fractions of the kept inputs, and the rest of every
    # node's flow, are exact to float32's precision
    n_readers = len(readers)
    candidates = torch.empty(n_readers, n_layers * (shape.d_ffn + shape.n_heads * shape.head_dim * n_tokens),
                             device=device)
    ffn = candidates[:, : n_layers * shape.d_ffn].view(n_readers, n_layers, shape.d_ffn)
    torch.mul(ffn_dots, coefficients, out=ffn).mul_(ffn_mask.unsqueeze(-1))
    heads = head_dots.view(n_readers, n_layers, shape.n_heads, shape.head_dim) * attention_mask.reshape(
        n_readers, n_layers, 1, 1)
    attention = candidates[:, n_layers * shape.d_ffn:].view(n_readers, n_layers, shape.n_heads, shape.head_dim,
                                                             n_tokens)
    torch.mul(heads.unsqueeze(-1), reached, out=attention)  # (R, L, H, d_h, T)
    top, picked = _largest_in_magnitude(candidates, count)
    n_ffn, per_layer = n_layers * shape.d_ffn, shape.n_heads * shape.head_dim * n_tokens
    chosen = []
    for flats, fractions_ in zip(top.tolist(), picked.tolist()):
        ffn_inputs, attention_inputs = [], []
        for flat, fraction in zip(flats, fractions_):
            if fraction == 0.0:
                continue
            if flat < n_ffn:
                ffn_inputs.append((*divmod(flat, shape.d_ffn), fraction))
            else:
                layer, rest = divmod(flat - n_ffn, per_layer)
                row, source = divmod(rest, n_tokens)
                attention_inputs.append((layer, row, source, fraction))
        chosen.append((ffn_inputs, attention_inputs))
    return chosen


def _largest_in_magnitude(candidates: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Per row, the indices and values of the `count` entries largest in magnitude: the largest and the smallest
    `count` merged (two selections instead of an absolute value of the whole tensor)."""
    count = min(count, candidates.shape[1])
    high, low = torch.topk(candidates, count, dim=1), torch.topk(candidates, count, dim=1, largest=False)
    values, indices = torch.cat([high.values, low.values], 1), torch.cat([high.indices, low.indices], 1)
    order = torch.topk(values.abs(), count, dim=1).indices
    return torch.gather(indices, 1, order), torch.gather(values, 1, order)


def _dots(stack: LayerStack, keys: Tensor, below: int, rows: int) -> Tensor:
    """(G, L, R): every row of each layer below `below` times each direction; zeros above (never read)."""
    result = torch.zeros(len(keys), stack.n_layers, rows, device=keys.device)
    for layer, matrix in enumerate(stack.layers[:below]):
        result[:, layer] = matrix.times_transposed(keys)
    return result
