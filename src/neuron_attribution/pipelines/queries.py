"""Query neurons and query layers of an attribution's top value neurons (docs/method.md §3), as results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.loading import LoadedModel
from ..model.trace import Trace
from ..neurons import ModelShape
from ..results.attribution import AttentionNeuron, FfnNeuron, QueryLayer, QueryLayers, QueryNeuron
from ..scoring import query
from ..scoring.topk import rank_by_score


@dataclass
class QueryScores:
    """Query scores of every FFN neuron, (L, N) per part, and the query layers."""

    attention: Tensor  # through attention value neurons' value rows
    ffn_parts: dict[str, Tensor]  # through FFN value neurons' subkeys: "key", or "gate" and "up"
    layers: QueryLayers
    skipped: list[str]
    shape: ModelShape

    @property
    def total(self) -> Tensor:
        return self.attention + sum(self.ffn_parts.values(), torch.zeros_like(self.attention))

    def top(self, k: int) -> list[QueryNeuron]:
        total = self.total.reshape(-1)
        ranked = rank_by_score(total, torch.arange(total.numel()))[:k]
        swiglu = "gate" in self.ffn_parts
        result = []
        for flat, (layer, neuron) in zip(ranked.tolist(), self.shape.ffn_indices(ranked)):
            ffn = sum(float(part[layer, neuron]) for part in self.ffn_parts.values())
            result.append(QueryNeuron(
                layer, neuron, float(total[flat]), float(self.attention[layer, neuron]), ffn,
                float(self.ffn_parts["gate"][layer, neuron]) if swiglu else None,
                float(self.ffn_parts["up"][layer, neuron]) if swiglu else None))
        return result


def query_scores(model: LoadedModel, trace: Trace, ffn_neurons: Sequence[FfnNeuron | query.FfnValueNeuron],
                 attention_neurons: Sequence[AttentionNeuron | query.AttentionValueNeuron]) -> QueryScores:
    """Query FFN neurons and query layers for the given value neurons (docs/method.md §3)."""
    shape = model.shape
    weights = [model.adapter.layer_weights(layer) for layer in range(shape.n_layers)]
    attention_readings, skipped_attention = query.usable(query.attention_readings(
        trace, weights, shape,
        [query.AttentionValueNeuron(n.layer, n.head, n.dim, n.position, n.score) for n in attention_neurons]))
    ffn_readings, skipped_ffn = query.usable(query.ffn_readings(
        trace, weights, [query.FfnValueNeuron(n.layer, n.neuron, n.score) for n in ffn_neurons], shape.parallel))
    parts = query.query_ffn_scores(trace, model.adapter.all_ffn_values, attention_readings + ffn_readings)
    zeros = torch.zeros(shape.n_layers, shape.d_ffn)
    attention = parts.pop("value", zeros)
    for name in weights[0].ffn_subkeys:
        parts.setdefault(name, zeros)
    layers = QueryLayers(_query_layer_rows(query.query_layer_scores(trace, ffn_readings), shape.n_layers),
                         _query_layer_rows(query.query_layer_scores(trace, attention_readings), shape.n_layers))
    return QueryScores(attention, parts, layers, skipped_attention + skipped_ffn, shape)


def _query_layer_rows(shares: dict[str, query.LayerShares], n_layers: int) -> list[QueryLayer]:
    """Rows in model order: embedding, then attention and FFN of each layer; gate/up parts for SwiGLU."""
    swiglu = "gate" in shares

    def row(component: str, layer: int | None, pick) -> QueryLayer:
        parts = {name: pick(s) for name, s in shares.items()}
        return QueryLayer(component, layer, sum(parts.values(), 0.0),
                          parts.get("gate") if swiglu else None, parts.get("up") if swiglu else None)

    rows = [row("embedding", None, lambda s: s.embedding)]
    for layer in range(n_layers):
        rows.append(row("attention", layer, lambda s, l=layer: float(s.attention[l])))
        rows.append(row("ffn", layer, lambda s, l=layer: float(s.ffn[l])))
    return rows
