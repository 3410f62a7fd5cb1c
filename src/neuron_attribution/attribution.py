"""`attribute()`: value neurons, layer and head scores for one prompt, as a result object people can keep."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .loading import LoadedModel
from .output import write_json
from .prediction import Prediction, top_predictions
from .prompts import Prompt, encode_prompt, encode_target, token_texts
from .readout import LinearReadout
from .scoring import query, value
from .trace import Trace, trace_token_ids

PROJECTION_TOKENS = 10
TOP_HEADS_WITH_POSITIONS = 5
QUERY_VALUE_NEURONS = 30  # value neurons of each kind whose query neurons and layers are scored


@dataclass
class TargetInfo:
    text: str
    id: int
    prob: float
    rank: int  # 1 = the model's top prediction
    n_answer_tokens: int = 1  # tokens the answer text spans; the first is scored


@dataclass
class LayerScores:
    attention: list[float]
    ffn: list[float]


@dataclass
class HeadScore:
    layer: int
    head: int
    score: float


@dataclass
class HeadPositionScore:
    layer: int
    head: int
    position: int
    token: str
    score: float


@dataclass
class FfnNeuron:
    layer: int
    neuron: int
    score: float
    coefficient: float
    top_tokens: list[str]
    bottom_tokens: list[str]


@dataclass
class AttentionNeuron:
    layer: int
    head: int
    dim: int
    position: int
    token: str
    score: float
    coefficient: float


@dataclass
class QueryNeuron:
    """An FFN neuron scored for activating the top value neurons. score = attention_score + ffn_score:
    through the attention value neurons' value-projection rows, and through the FFN value neurons' subkeys
    (for SwiGLU ffn_score = gate_score + up_score; the two are None for GELU models)."""

    layer: int
    neuron: int
    score: float
    attention_score: float
    ffn_score: float
    gate_score: float | None = None
    up_score: float | None = None


@dataclass
class QueryLayer:
    component: str  # "embedding", "attention" or "ffn"
    layer: int | None  # None for the embedding
    score: float
    gate_score: float | None = None  # SwiGLU FFN value neurons: the two subkeys' parts of score
    up_score: float | None = None


@dataclass
class QueryLayers:
    for_ffn: list[QueryLayer]
    for_attention: list[QueryLayer]


@dataclass
class DenseScores:
    ffn: np.ndarray  # (L, N)
    attention: np.ndarray  # (L, H, d_h, T)


@dataclass
class Attribution:
    prompt: str
    model: str
    tokens: list[str]
    target: TargetInfo
    predictions: list[Prediction]
    layers: LayerScores
    heads: list[HeadScore]
    ffn_neurons: list[FfnNeuron]
    attention_neurons: list[AttentionNeuron]
    head_positions: list[HeadPositionScore]
    query_neurons: list[QueryNeuron] = field(default_factory=list)
    query_layers: QueryLayers = field(default_factory=lambda: QueryLayers([], []))
    query_skipped: list[str] = field(default_factory=list)  # value neurons whose subkey input h·K' ≈ 0
    reference: bool = False
    evaluated: dict[str, int] = field(default_factory=dict)  # neurons scored exactly, per kind
    dense: DenseScores | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "dense"}
        # gate/up parts exist only for SwiGLU models; GELU results leave the keys out rather than null them.
        data["query_neurons"] = [_without_missing_subkeys(q) for q in data["query_neurons"]]
        data["query_layers"] = {kind: [_without_missing_subkeys(q) for q in rows]
                                for kind, rows in data["query_layers"].items()}
        return data

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        return cls(
            prompt=data["prompt"], model=data.get("model", ""), tokens=data["tokens"],
            target=TargetInfo(**data["target"]), predictions=[Prediction(**p) for p in data.get("predictions", [])],
            layers=LayerScores(**data["layers"]), heads=[HeadScore(**h) for h in data["heads"]],
            ffn_neurons=[FfnNeuron(**n) for n in data["ffn_neurons"]],
            attention_neurons=[AttentionNeuron(**n) for n in data["attention_neurons"]],
            head_positions=[HeadPositionScore(**h) for h in data.get("head_positions", [])],
            query_neurons=[QueryNeuron(**q) for q in data.get("query_neurons", [])],
            query_layers=QueryLayers(*([QueryLayer(**q) for q in data.get("query_layers", {}).get(kind, [])]
                                       for kind in ("for_ffn", "for_attention"))),
            query_skipped=data.get("query_skipped", []),
            reference=data.get("reference", False), evaluated=data.get("evaluated", {}))

    @classmethod
    def load(cls, path: Path | str) -> Attribution:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read an attribution from {path}: {error}") from None


def _without_missing_subkeys(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not (k in ("gate_score", "up_score") and v is None)}


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive whole number, got {value!r}")


def readout_for(model: LoadedModel, trace: Trace, reference: bool = False) -> LinearReadout:
    unembedding, bias = model.adapter.unembedding
    return LinearReadout.at(model.adapter.final_norm(), unembedding, bias, trace.final_residual[-1],
                            reference=reference, max_unembedding_norm=model.adapter.max_unembedding_norm)


def value_context(model: LoadedModel, trace: Trace, target: int, reference: bool = False) -> value.ValueContext:
    adapter = model.adapter
    return value.ValueContext.build(trace, adapter.all_ffn_values, adapter.all_output_weights, model.shape,
                                    readout_for(model, trace, reference), target)


def attribute(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *, top_k: int = 100,
              dense: bool = False, reference: bool = False, query_top: int = QUERY_VALUE_NEURONS) -> Attribution:
    """Value neurons for one prompt: which FFN and attention neurons raise log p(target), and the query
    neurons and layers that activate the top `query_top` value neurons of each kind. A `query_top` larger
    than the model's number of neurons of a kind is clamped to it."""
    return attribute_batch(model, [prompt], None if target is None else [target], top_k=top_k, dense=dense,
                           reference=reference, query_top=query_top)[0]


def attribute_batch(model: LoadedModel, prompts: Sequence[Prompt], targets: Sequence[str | int | None] | None = None,
                    *, top_k: int = 100, dense: bool = False, reference: bool = False,
                    query_top: int = QUERY_VALUE_NEURONS, batch_size: int = 8) -> list[Attribution]:
    """`attribute` for many prompts, sharing forward passes (right-padded batches of `batch_size`)."""
    _check_positive("top_k", top_k)
    _check_positive("query_top", query_top)
    _check_positive("batch_size", batch_size)
    options = _Options(top_k, query_top, dense, reference)
    if targets is not None and len(targets) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [encode_prompt(model, p) for p in prompts]
    results = []
    for start in range(0, len(encoded), batch_size):
        traces = trace_token_ids(model, encoded[start: start + batch_size])
        for offset, trace in enumerate(traces):
            i = start + offset
            target = None if targets is None else targets[i]
            results.append(_attribute_trace(model, prompts[i], encoded[i], trace, target, options))
    return results


@dataclass(frozen=True)
class _Options:
    top_k: int
    query_top: int
    dense: bool
    reference: bool


def _attribute_trace(model: LoadedModel, prompt: Prompt, ids: list[int], trace: Trace, target: str | int | None,
                     options: _Options) -> Attribution:
    top_k = options.top_k
    if target is None:
        target_token = encode_target(model, ids, prompt, int(trace.logits.argmax()))
    else:
        target_token = encode_target(model, ids, prompt, target)
    ctx = value_context(model, trace, target_token.id, options.reference)
    tokens = token_texts(model, ids)
    probs = torch.softmax(trace.logits.double(), dim=-1)
    target_info = TargetInfo(target_token.text, target_token.id, float(probs[target_token.id]),
                             int((probs > probs[target_token.id]).sum()) + 1, target_token.n_answer_tokens)

    attention_layers, ffn_layers = value.layer_scores(ctx)
    scores = value.value_scores(ctx, max(top_k, options.query_top), TOP_HEADS_WITH_POSITIONS, PROJECTION_TOKENS)
    heads = scores.heads
    head_list = [HeadScore(l, h, float(heads[l, h])) for l in range(heads.shape[0]) for h in range(heads.shape[1])]
    head_list.sort(key=lambda s: -s.score)
    head_positions = [HeadPositionScore(l, h, p, tokens[p], float(scores.positions[i, p]))
                      for i, (l, h) in enumerate(scores.position_heads) for p in range(scores.positions.shape[1])]
    ffn_top, attention_top = scores.ffn, scores.attention
    ffn_neurons = _ffn_neurons(model, ctx, ffn_top)
    attention_neurons = _attention_neurons(ctx, attention_top, tokens)
    queries = query_scores(model, trace, ffn_neurons[: options.query_top], attention_neurons[: options.query_top])
    return Attribution(
        prompt=prompt if isinstance(prompt, str) else "".join(tokens),
        model=model.name,
        tokens=tokens,
        target=target_info,
        predictions=top_predictions(model, trace.logits, 10),
        layers=LayerScores(attention_layers.tolist(), ffn_layers.tolist()),
        heads=head_list,
        ffn_neurons=ffn_neurons[:top_k],
        attention_neurons=attention_neurons[:top_k],
        head_positions=head_positions,
        query_neurons=queries.top(top_k),
        query_layers=queries.layers,
        query_skipped=queries.skipped,
        reference=options.reference,
        evaluated={"ffn": ffn_top.n_evaluated, "attention": attention_top.n_evaluated},
        dense=_dense(ctx) if options.dense else None,
    )


@dataclass
class QueryScores:
    """Query scores of every FFN neuron, (L, N) per part, and the query layers."""

    attention: Tensor  # through attention value neurons' value rows
    ffn_parts: dict[str, Tensor]  # through FFN value neurons' subkeys: "key", or "gate" and "up"
    layers: QueryLayers
    skipped: list[str]

    @property
    def total(self) -> Tensor:
        return self.attention + sum(self.ffn_parts.values(), torch.zeros_like(self.attention))

    def top(self, k: int) -> list[QueryNeuron]:
        total = self.total.reshape(-1)
        n_ffn = self.attention.shape[1]
        ranked = value.rank_by_score(total, torch.arange(total.numel()))[:k].tolist()
        swiglu = "gate" in self.ffn_parts
        result = []
        for flat in ranked:
            layer, neuron = divmod(flat, n_ffn)
            ffn = sum(float(part[layer, neuron]) for part in self.ffn_parts.values())
            result.append(QueryNeuron(
                layer, neuron, float(total[flat]), float(self.attention[layer, neuron]), ffn,
                float(self.ffn_parts["gate"][layer, neuron]) if swiglu else None,
                float(self.ffn_parts["up"][layer, neuron]) if swiglu else None))
        return result


def query_scores(model: LoadedModel, trace: Trace, ffn_neurons: Sequence[FfnNeuron | query.FfnValueNeuron],
                 attention_neurons: Sequence[AttentionNeuron | query.AttentionValueNeuron]) -> QueryScores:
    """Query FFN neurons and query layers for the given value neurons (METHOD.md §3)."""
    shape = model.shape
    weights = [model.adapter.layer_weights(layer) for layer in range(shape.n_layers)]
    attention_readings, skipped_attention = query.usable(query.attention_readings(
        trace, weights, shape,
        [query.AttentionValueNeuron(n.layer, n.head, n.dim, n.position, n.score) for n in attention_neurons]))
    ffn_readings, skipped_ffn = query.usable(query.ffn_readings(
        trace, weights, [query.FfnValueNeuron(n.layer, n.neuron, n.score) for n in ffn_neurons]))
    parts = query.query_ffn_scores(trace, model.adapter.all_ffn_values, attention_readings + ffn_readings)
    zeros = torch.zeros(shape.n_layers, shape.d_ffn)
    attention = parts.pop("value", zeros)
    for name in weights[0].ffn_subkeys:
        parts.setdefault(name, zeros)
    layers = QueryLayers(_query_layer_rows(query.query_layer_scores(trace, ffn_readings), shape.n_layers),
                         _query_layer_rows(query.query_layer_scores(trace, attention_readings), shape.n_layers))
    return QueryScores(attention, parts, layers, skipped_attention + skipped_ffn)


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


def _ffn_neurons(model: LoadedModel, ctx: value.ValueContext, top: value.TopK) -> list[FfnNeuron]:
    n = ctx.shape.d_ffn
    coefficients = value.ffn_coefficients(ctx)
    result = []
    for flat, score, projection in zip(top.indices.tolist(), top.scores.tolist(), top.extra.tolist()):
        layer, neuron = divmod(flat, n)
        result.append(FfnNeuron(layer, neuron, score, float(coefficients[layer, neuron]),
                                token_texts(model, projection[:PROJECTION_TOKENS]),
                                token_texts(model, projection[PROJECTION_TOKENS:])))
    return result


def _attention_neurons(ctx: value.ValueContext, top: value.TopK, tokens: list[str]) -> list[AttentionNeuron]:
    s, n_tokens = ctx.shape, ctx.trace.n_tokens
    coefficients = ctx.attention_coefficients
    result = []
    for flat, score in zip(top.indices.tolist(), top.scores.tolist()):
        layer, head, dim, position = np.unravel_index(flat, (s.n_layers, s.n_heads, s.head_dim, n_tokens))
        result.append(AttentionNeuron(int(layer), int(head), int(dim), int(position), tokens[position], score,
                                      float(coefficients[layer, head, dim, position])))
    return result


def _dense(ctx: value.ValueContext) -> DenseScores:
    return DenseScores(value.dense_ffn_scores(ctx).numpy(), value.dense_attention_scores(ctx).numpy())


# --- vocabulary projection ---------------------------------------------------------------------------------

@dataclass
class Projection:
    top_tokens: list[str]
    top_ids: list[int]
    top_values: list[float]
    bottom_tokens: list[str]
    bottom_ids: list[int]
    bottom_values: list[float]


def project(model: LoadedModel, neuron: FfnNeuron | AttentionNeuron | tuple, k: int = 10) -> Projection:
    """The neuron's value vector through the final norm's gain and the unembedding, U(γ ⊙ u), sorted.

    `neuron`: an FfnNeuron, an AttentionNeuron, ("ffn", layer, neuron) or ("attention", layer, head, dim).
    Top tokens are promoted when the neuron's coefficient is positive, bottom tokens when it is negative."""
    return _projection_of(model, _neuron_vector(model, neuron), k)


def _projection_of(model: LoadedModel, vector: torch.Tensor, k: int) -> Projection:
    norm = model.adapter.final_norm()
    unembedding, _ = model.adapter.unembedding
    if norm.kind == "layernorm":
        vector = vector - vector.mean()
    logits = unembedding @ (norm.weight * vector)
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return Projection(token_texts(model, top.indices.tolist()), top.indices.tolist(), top.values.tolist(),
                      token_texts(model, bottom.indices.tolist()), bottom.indices.tolist(), bottom.values.tolist())


def _neuron_vector(model: LoadedModel, neuron) -> torch.Tensor:
    if isinstance(neuron, FfnNeuron):
        neuron = ("ffn", neuron.layer, neuron.neuron)
    elif isinstance(neuron, AttentionNeuron):
        neuron = ("attention", neuron.layer, neuron.head, neuron.dim)
    s = model.shape
    try:
        kind, layer, *rest = neuron
        if not 0 <= layer < s.n_layers:
            raise IndexError(f"layer {layer} outside 0..{s.n_layers - 1}")
        weights = model.adapter.layer_weights(layer)
        if kind == "ffn":
            (index,) = rest
            if not 0 <= index < s.d_ffn:
                raise IndexError(f"FFN neuron {index} outside 0..{s.d_ffn - 1}")
            return weights.ffn_values[index]
        if kind == "attention":
            head, dim = rest[:2]
            if not (0 <= head < s.n_heads and 0 <= dim < s.head_dim):
                raise IndexError(f"head {head} / dim {dim} outside the model's {s.n_heads}×{s.head_dim}")
            return weights.output_weight[head, dim]
    except (ValueError, TypeError, IndexError) as error:
        raise UserError(f"not a neuron of this model: {neuron!r} ({error})") from None
    raise UserError(f"unknown neuron kind {neuron[0]!r}; use 'ffn' or 'attention'")


__all__ = ["AttentionNeuron", "Attribution", "FfnNeuron", "HeadScore", "Projection", "QueryLayer", "QueryNeuron",
           "attribute", "attribute_batch", "project", "query_scores"]


# --- query-only vs query-value, and reading a query neuron through a head -----------------------------------

@dataclass
class QueryValueSplit:
    """Top-n query FFN neurons, split by whether they are also among the top-n FFN value neurons."""

    n: int
    query_only: list[tuple[int, int]]  # (layer, neuron)
    query_value: list[tuple[int, int]]
    query_only_per_layer: list[int]  # histogram over layers
    query_value_per_layer: list[int]


def query_value_split(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *, n: int = 300,
                      query_top: int = QUERY_VALUE_NEURONS) -> QueryValueSplit:
    """METHOD.md §3: the top-n query neurons minus those also in the top-n FFN value neurons."""
    result = attribute(model, prompt, target, top_k=n, query_top=query_top)
    return split_queries(result, model.shape.n_layers)


def split_queries(result: Attribution, n_layers: int) -> QueryValueSplit:
    """The split for an attribution already made; n is its `top_k` (the length of its lists)."""
    values = {(v.layer, v.neuron) for v in result.ffn_neurons}
    queries = [(q.layer, q.neuron) for q in result.query_neurons]
    query_value = [q for q in queries if q in values]
    query_only = [q for q in queries if q not in values]

    def histogram(neurons: list[tuple[int, int]]) -> list[int]:
        counts = [0] * n_layers
        for layer, _ in neurons:
            counts[layer] += 1
        return counts

    return QueryValueSplit(len(queries), query_only, query_value, histogram(query_only), histogram(query_value))


def interpret_query_neuron(model: LoadedModel, ffn_layer: int, neuron: int, layer: int, head: int,
                           k: int = 10) -> Projection:
    """A query FFN neuron as one head carries it (METHOD.md §3): its value vector through `layer`'s input
    norm, `head`'s value and output projections, then projected to the vocabulary like any neuron."""
    s = model.shape
    if not (0 <= ffn_layer < s.n_layers and 0 <= neuron < s.d_ffn and 0 <= layer < s.n_layers
            and 0 <= head < s.n_heads):
        raise UserError(f"no FFN neuron {ffn_layer}_{neuron} or head {layer}.{head} in this model")
    vector = model.adapter.layer_weights(ffn_layer).ffn_values[neuron]
    carried = query.interpret_through_head(model.adapter.layer_weights(layer), s, vector, head)
    return _projection_of(model, carried, k)
