"""Query neurons and query layers of an attribution's top value neurons (docs/method.md §3), as results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.loaded import LoadedModel
from ..model.trace import Trace, with_positions
from ..neurons import ModelShape
from ..model.weights import LayerStack
from ..results.attribution import AttentionNeuron, FfnNeuron, QueryLayer, QueryLayers, QueryLink, QueryNeuron
from ..scoring import query
from ..scoring.topk import rank_by_score
from ..settings import QUERY_PATHS, check_choice


@dataclass
class QueryScores:
    """Query scores of every FFN neuron, (L, N) per part, and the query layers, through the chosen path."""

    attention: Tensor | None  # through attention value neurons' value rows (None: path not taken)
    ffn_parts: dict[str, Tensor] | None  # through FFN value neurons' subkeys: "key", or "gate" and "up"
    layers: QueryLayers
    skipped: list[str]
    shape: ModelShape
    via: str = "both"
    # The chosen path's scores split by the position where they were read (an attention value neuron's source
    # position, or the last position for FFN value neurons), and the traces that hold the coefficients there.
    by_position: dict[int, Tensor] | None = None
    traces: list[Trace] | None = None
    # The chosen path's readings, one list per trace (the links of query to value neurons are made from them),
    # and the FFN neurons' residual directions.
    readings: list[list[query.SubkeyReading]] | None = None
    ffn_values: LayerStack | None = None

    @property
    def total(self) -> Tensor:
        """(L, N): the score of the chosen path (the sum of both for "both")."""
        parts = [] if self.attention is None else [self.attention]
        parts += list((self.ffn_parts or {}).values())
        return torch.stack(parts).sum(0)

    def top(self, k: int, tokens: Sequence[str] | None = None) -> list[QueryNeuron]:
        total = self.total.reshape(-1)
        ranked = rank_by_score(total)[:k]
        result = []
        for flat, index in zip(ranked.tolist(), self.shape.ffn_indices(ranked)):
            row = self.shape.ffn_row(index)
            position, coefficient = self._where(index.layer, row)
            token = tokens[position] if tokens is not None and position is not None else None
            result.append(QueryNeuron(index.layer, index.neuron, float(total[flat]), *self._paths(index.layer, row),
                                      position=position, token=token, coefficient=coefficient, expert=index.expert))
        return result

    def links(self, n: int) -> list[QueryLink]:
        """The top `n` query neurons' shares in each value neuron they help activate (docs/method.md §3), summed
        over subkeys and predicting positions, largest magnitude first; a query neuron's shares add up to its
        score."""
        if not n or not self.readings or self.ffn_values is None:
            return []
        layers, rows = self.shape.ffn_unflat(rank_by_score(self.total.reshape(-1))[:n].to(self.ffn_values.device))
        names = list(dict.fromkeys(r.value_neuron for readings in self.readings for r in readings))
        column = {name: i for i, name in enumerate(names)}
        totals = torch.zeros(len(layers), len(names), device=self.ffn_values.device)
        for trace, readings in zip(self.traces or [], self.readings):
            target = torch.tensor([column[r.value_neuron] for r in readings], dtype=torch.long, device=totals.device)
            totals.index_add_(1, target, query.query_links(trace, self.ffn_values, readings, layers, rows))
        queries = [str(self.shape.ffn_index(layer, row)) for layer, row in zip(layers.tolist(), rows.tolist())]
        links = [QueryLink(queries[q], names[v], share) for q, shares in enumerate(totals.tolist())
                 for v, share in enumerate(shares) if share != 0.0]
        return sorted(links, key=lambda link: -abs(link.share))

    def _where(self, layer: int, neuron: int) -> tuple[int | None, float | None]:
        """The position that holds the largest part (by magnitude) of the neuron's score, and its coefficient
        there (the sign says which end of `interpret_query_neuron`'s projection it writes)."""
        if not self.by_position:
            return None, None
        positions = sorted(self.by_position)
        parts = torch.stack([self.by_position[p][layer, neuron] for p in positions])
        position = positions[int(parts.abs().argmax())]
        trace = next(t for t in self.traces or [] if position < t.n_tokens)
        return position, float(trace.ffn_residual_coefficients(position)[layer, neuron])

    def _paths(self, layer: int, neuron: int) -> tuple[float | None, float | None, float | None, float | None]:
        """attention_score, ffn_score, gate_score, up_score: None for a path not taken (and gate/up for GELU)."""
        attention = None if self.attention is None else float(self.attention[layer, neuron])
        if self.ffn_parts is None:
            return attention, None, None, None
        parts = {name: float(part[layer, neuron]) for name, part in self.ffn_parts.items()}
        return attention, sum(parts.values()), parts.get("gate"), parts.get("up")


def query_scores(model: LoadedModel, trace: Trace, ffn_neurons: Sequence[FfnNeuron | query.FfnValueNeuron],
                 attention_neurons: Sequence[AttentionNeuron | query.AttentionValueNeuron],
                 via: str = "both") -> QueryScores:
    """Query FFN neurons and query layers for the given value neurons (docs/method.md §3), through the
    attention value neurons ("attention", the paper's method), the FFN value neurons ("ffn"), or both."""
    check_choice("query_via", via, QUERY_PATHS)
    shape = model.shape
    if via != "ffn":
        trace = with_positions(model, trace, [n.position for n in attention_neurons])
    weights = [model.adapter.layer_weights(layer) for layer in range(shape.n_layers)]
    attention_readings, ffn_readings, skipped = [], [], []
    near_zero = query.near_zero_cosine(next(model.hf_model.parameters()).dtype)
    if via in ("attention", "both"):
        attention_readings, skipped = query.usable(query.attention_readings(
            trace, weights, shape,
            [query.AttentionValueNeuron(n.layer, n.head, n.dim, n.position, n.score) for n in attention_neurons]),
            near_zero)
    if via in ("ffn", "both"):
        readings, split_skipped = query.ffn_readings(
            trace, weights, [value_neuron(shape, n) for n in ffn_neurons], shape.parallel,
            model.adapter.ffn_activation)
        ffn_readings, ffn_skipped = query.usable(readings, near_zero)
        skipped += split_skipped + ffn_skipped
    by_position: dict[int, Tensor] = {}
    parts = query.query_ffn_scores(trace, model.adapter.ffn_value_stack, attention_readings + ffn_readings,
                                   by_position)
    zeros = torch.zeros(shape.n_layers, shape.d_ffn, device=model.adapter.device)
    attention = parts.pop("value", zeros) if via != "ffn" else None
    ffn_parts = {name: parts.get(name, zeros) for name in weights[0].ffn_subkeys} if via != "attention" else None
    layers = QueryLayers(
        _query_layer_rows(query.query_layer_scores(trace, ffn_readings), shape.n_layers) if via != "attention" else [],
        _query_layer_rows(query.query_layer_scores(trace, attention_readings), shape.n_layers) if via != "ffn" else [])
    return QueryScores(attention, ffn_parts, layers, skipped, shape, via, by_position, [trace],
                       [attention_readings + ffn_readings], model.adapter.ffn_value_stack)


def summed_query_scores(parts: list[QueryScores]) -> QueryScores:
    """Query scores of several predicting positions (teacher-forced answer tokens) added up."""
    first = parts[0]

    def add(tensors: list[Tensor | None]) -> Tensor | None:
        return None if tensors[0] is None else torch.stack(tensors).sum(0)

    def add_rows(rows: list[list[QueryLayer]]) -> list[QueryLayer]:
        def total(values):
            return None if values[0] is None else sum(values)
        return [QueryLayer(row[0].component, row[0].layer, sum(r.score for r in row),
                           total([r.gate_score for r in row]), total([r.up_score for r in row])) for row in zip(*rows)]

    ffn_parts = None if first.ffn_parts is None else {
        name: torch.stack([p.ffn_parts[name] for p in parts]).sum(0) for name in first.ffn_parts}
    layers = QueryLayers(add_rows([p.layers.for_ffn for p in parts]),
                         add_rows([p.layers.for_attention for p in parts]))
    skipped = list(dict.fromkeys(label for p in parts for label in p.skipped))
    by_position: dict[int, Tensor] = {}
    for part in parts:
        for position, shares in (part.by_position or {}).items():
            by_position[position] = by_position[position] + shares if position in by_position else shares
    return QueryScores(add([p.attention for p in parts]), ffn_parts, layers, skipped, first.shape, first.via,
                       by_position, [t for p in parts for t in p.traces or []],
                       [r for p in parts for r in p.readings or []], first.ffn_values)


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


def value_neuron(shape, neuron: FfnNeuron | query.FfnValueNeuron, score: float | None = None
                 ) -> query.FfnValueNeuron:
    """A result's FFN neuron as scoring reads it: by its row in the layer's flat layout (`score`: instead of
    the neuron's own)."""
    if isinstance(neuron, query.FfnValueNeuron):
        return neuron
    return query.FfnValueNeuron(neuron.layer, shape.ffn_row(neuron.index), neuron.score if score is None else score,
                                str(neuron.index))
