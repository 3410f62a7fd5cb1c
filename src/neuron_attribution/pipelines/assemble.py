"""Scores into results, in one place for single-token and multi-token answers alike: the returned value neurons
(a top-k search's indices, scores and details: projection ids, direct parts, the target's push rank, per-token
scores) as `FfnNeuron`s and `AttentionNeuron`s, and the whole `Attribution`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, token_texts
from ..neurons import AttentionIndex
from ..results.attribution import (AttentionNeuron, Attribution, DenseScores, FfnNeuron, HeadPositionScore,
                                   LayerScores, QueryLayers, TargetInfo)
from ..scoring.topk import TopK
from ..settings import ScoringOptions
from .predict import top_predictions
from .queries import QueryScores
from .targets import PROJECTION_TOKENS, prompt_text, ranked_heads


def ffn_neurons(model: LoadedModel, top: TopK, coefficients: Tensor) -> list[FfnNeuron]:
    """`coefficients`: (L, N) at the (first) predicting position."""
    details = _details(top)
    neurons = []
    for row, index in enumerate(model.shape.ffn_indices(top.indices)):
        ids = details["projection"][row]
        coefficient = float(coefficients[index.layer, model.shape.ffn_row(index)])
        neurons.append(FfnNeuron(index.layer, index.neuron, details["score"][row], coefficient,
                                 token_texts(model, ids[:PROJECTION_TOKENS]),
                                 token_texts(model, ids[PROJECTION_TOKENS:]),
                                 token_scores=details["per_token"][row], **_parts(details, row), expert=index.expert))
    return neurons


def attention_neurons(model: LoadedModel, top: TopK, n_tokens: int, tokens: list[str],
                      coefficient_of: Callable[[AttentionIndex], float]) -> list[AttentionNeuron]:
    """`n_tokens`: the positions the flat indices run over; `coefficient_of`: where each neuron's coefficient is
    read (the predicting position that first sees its source position)."""
    details = _details(top)
    neurons = []
    for row, index in enumerate(model.shape.attention_indices(top.indices, n_tokens)):
        coefficient = coefficient_of(index)
        top_ids, bottom_ids = _ends(details["projection"][row])
        promoted, suppressed = (top_ids, bottom_ids) if coefficient >= 0 else (bottom_ids, top_ids)
        neurons.append(AttentionNeuron(*index, tokens[index.position], details["score"][row], coefficient,
                                       token_scores=details["per_token"][row],
                                       promoted_tokens=token_texts(model, promoted),
                                       suppressed_tokens=token_texts(model, suppressed), **_parts(details, row)))
    return neurons


def _details(top: TopK) -> dict[str, list]:
    """Python lists of everything kept per returned neuron (absent details as None per row)."""
    extra = {name: values.tolist() for name, values in (top.extra or {}).items()}
    n = len(top.indices)
    return {"score": top.scores.tolist(), "projection": extra.get("projection", [[]] * n),
            "direct": extra.get("direct", [None] * n), "target_push_rank": extra.get("target_push_rank", [None] * n),
            "per_token": extra.get("per_token", [None] * n)}


def _ends(ids: list[int]) -> tuple[list[int], list[int]]:
    return ids[:PROJECTION_TOKENS], ids[PROJECTION_TOKENS:]


def _parts(details: dict[str, list], row: int) -> dict:
    """direct_score, normaliser_change (= direct − score) and target_push_rank of one row."""
    direct, score = details["direct"][row], details["score"][row]
    return {"direct_score": direct, "normaliser_change": None if direct is None else direct - score,
            "target_push_rank": details["target_push_rank"][row]}


@dataclass
class HeadScores:
    """Every head's score (L, H), and position scores (len(position_heads), T) inside the top heads."""

    heads: Tensor
    position_heads: list[tuple[int, int]]
    positions: Tensor
    direct: Tensor | None = None  # (L, H): each head's direct part


QUERY_LINKED = 30  # query neurons whose links to each value neuron an attribution keeps


def attribution_of(model: LoadedModel, prompt: Prompt, ids: list[int], tokens: list[str], target: TargetInfo,
                   logits: Tensor, layers: tuple[Tensor, Tensor], heads: HeadScores, ffn: list[FfnNeuron],
                   attention: list[AttentionNeuron], queries: QueryScores | None, options: ScoringOptions,
                   evaluated: dict[str, int], vocab_size: int, dense: DenseScores | None = None,
                   layer_direct: tuple[Tensor, Tensor] | None = None) -> Attribution:
    """The `Attribution` of one prompt. `tokens`: the positions neurons are indexed over; `logits`: the
    prompt's last-position logits (its predictions)."""
    top_k = options.top_k
    return Attribution(
        prompt=prompt_text(model, prompt, ids), model=model.name, tokens=tokens, target=target,
        predictions=top_predictions(model, logits, 10),
        layers=LayerScores(layers[0].tolist(), layers[1].tolist(),
                           *(() if layer_direct is None else (layer_direct[0].tolist(), layer_direct[1].tolist()))),
        heads=ranked_heads(model.shape, heads.heads, heads.direct),
        ffn_neurons=ffn[:top_k], attention_neurons=attention[:top_k],
        head_positions=[HeadPositionScore(l, h, p, tokens[p], float(heads.positions[row, p]))
                        for row, (l, h) in enumerate(heads.position_heads) for p in range(heads.positions.shape[1])],
        query_neurons=[] if queries is None else queries.top(top_k, tokens),
        query_layers=QueryLayers([], []) if queries is None else queries.layers,
        query_skipped=[] if queries is None else queries.skipped,
        query_links=[] if queries is None else queries.links(QUERY_LINKED),
        reference=options.reference, query_via=options.query_via, evaluated=evaluated, rank_by=options.rank_by,
        vocab_size=vocab_size, dense=dense)
