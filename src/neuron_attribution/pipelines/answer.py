"""Multi-token answers (`answer_tokens="all"`, docs/method.md §2): the prompt and the answer's first i−1 tokens
predict token i; every score is summed over those teacher-forced predicting positions, and each neuron keeps
its per-token scores. The evaluation metrics stay first-token, as in the paper."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model.loading import LoadedModel
from ..model.prompts import Prompt, encode_answer, encode_prompt, token_texts
from ..model.trace import trace_token_ids
from ..neurons import AttentionIndex
from ..results.attribution import Attribution, HeadPositionScore, LayerScores, QueryLayers
from ..scoring import query
from ..scoring.answer import answer_scores
from ..scoring.context import ValueContext, value_context
from ..settings import ScoringOptions
from . import value_neurons
from .targets import PROJECTION_TOKENS, TOP_HEADS_WITH_POSITIONS, prompt_text, ranked_heads, target_info, token_info
from .predict import top_predictions
from .queries import query_scores, summed_query_scores


def attribute_answer(model: LoadedModel, prompt: Prompt, answer: str | int | list[int] | None,
                     options: ScoringOptions) -> Attribution:
    """Value (and query) neurons of every token of `answer` (text, or a list of token ids)."""
    if answer is None:
        raise UserError("answer_tokens='all' needs the answer (text or token ids), not the top prediction")
    ids = encode_prompt(model, prompt)
    answer_ids = encode_answer(model, ids, prompt, answer)
    prefixes = [ids + answer_ids[:i] for i in range(len(answer_ids))]
    traces = trace_token_ids(model, prefixes)
    contexts = [value_context(model, trace, token, reference=options.reference, memory_budget=options.memory_budget,
                              budget_fixed=options.budget_fixed)
                for trace, token in zip(traces, answer_ids)]
    tokens = token_texts(model, prefixes[-1])
    shape = model.shape
    scores = answer_scores(contexts, max(options.top_k, options.query_top), TOP_HEADS_WITH_POSITIONS,
                           PROJECTION_TOKENS)
    target = target_info(model, prompt, ids, traces[0], answer_ids[0])
    target.tokens = [token_info(torch.softmax(trace.logits.double(), dim=-1), token, token_texts(model, [token])[0])
                     for trace, token in zip(traces, answer_ids)]
    target.n_answer_tokens = len(answer_ids)
    heads = ranked_heads(shape, scores.heads)
    ffn_neurons = value_neurons.ffn_neurons(model, scores.ffn, contexts[0].ffn_coefficients)
    attention_neurons = value_neurons.attention_neurons(model, scores.attention, len(tokens), tokens,
                                                        lambda index: _first_coefficient(contexts, index))
    query_neurons, query_layers, skipped = [], QueryLayers([], []), []
    if options.query_top:
        queries = summed_query_scores([
            query_scores(model, c.trace, [query.FfnValueNeuron(n.layer, n.neuron, n.token_scores[i])
                                          for n in ffn_neurons[: options.query_top]],
                         [query.AttentionValueNeuron(n.layer, n.head, n.dim, n.position, n.token_scores[i])
                          for n in attention_neurons[: options.query_top] if n.position < c.trace.n_tokens],
                         options.query_via)
            for i, c in enumerate(contexts)])
        query_neurons, query_layers, skipped = queries.top(options.top_k, tokens), queries.layers, queries.skipped
    return Attribution(
        prompt=prompt_text(model, prompt, ids), model=model.name, tokens=tokens, target=target,
        predictions=top_predictions(model, traces[0].logits, 10),
        layers=LayerScores(scores.layers[0].tolist(), scores.layers[1].tolist()), heads=heads,
        ffn_neurons=ffn_neurons[: options.top_k], attention_neurons=attention_neurons[: options.top_k],
        head_positions=[HeadPositionScore(l, h, p, tokens[p], float(scores.positions[row, p]))
                        for row, (l, h) in enumerate(scores.position_heads) for p in range(len(tokens))],
        query_neurons=query_neurons, query_layers=query_layers, query_skipped=skipped, reference=options.reference,
        query_via=options.query_via,
        evaluated={"ffn": scores.ffn.n_evaluated, "attention": scores.attention.n_evaluated},
        vocab_size=contexts[0].readout.unembedding.shape[0])


def _first_coefficient(contexts: list[ValueContext], index: AttentionIndex) -> float:
    """An attention neuron's coefficient at the first predicting position that sees its source position."""
    first = next(c for c in contexts if index.position < c.trace.n_tokens)
    return float(first.attention_coefficients[index])
