"""Helpers for the paper's analyses of one attribution (docs/method.md §3): query-only vs query-value neurons."""

from __future__ import annotations

from ..model.loaded import LoadedModel
from ..model.prompts import Prompt
from ..results.attribution import Attribution, QueryValueSplit
from ..settings import DEFAULT_QUERY_TOP
from .attribute import attribute


def query_value_split(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *, n: int = 300,
                      query_top: int = DEFAULT_QUERY_TOP) -> QueryValueSplit:
    """The top-n query neurons minus those also in the top-n FFN value neurons."""
    result = attribute(model, prompt, target, top_k=n, query_top=query_top)
    return split_queries(result, model.shape.n_layers)


def split_queries(result: Attribution, n_layers: int) -> QueryValueSplit:
    """The split for an attribution already made; n is its `top_k` (the length of its lists)."""
    values = {_key(v.index) for v in result.ffn_neurons}
    queries = [_key(q.index) for q in result.query_neurons]
    query_value = [q for q in queries if q in values]
    query_only = [q for q in queries if q not in values]

    def histogram(neurons: list[tuple[int, ...]]) -> list[int]:
        counts = [0] * n_layers
        for neuron in neurons:
            counts[neuron[0]] += 1
        return counts

    return QueryValueSplit(len(queries), query_only, query_value, histogram(query_only), histogram(query_value))


def _key(index) -> tuple[int, ...]:
    """(layer, neuron), and the expert in a mixture of experts."""
    return tuple(index[:2]) if index.expert is None else tuple(index)
