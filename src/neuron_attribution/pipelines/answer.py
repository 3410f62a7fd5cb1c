"""Multi-token answers (`answer_tokens="all"`, docs/method.md §2): the prompt and the answer's first i−1 tokens
predict token i; every score is summed over those teacher-forced predicting positions, and each neuron keeps
its per-token scores. The evaluation metrics stay first-token, as in the paper."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_answer, encode_prompt, token_texts
from ..model.trace import trace_token_ids
from ..neurons import AttentionIndex
from ..results.attribution import Attribution
from ..scoring import query
from ..scoring.answer import answer_scores
from ..scoring.context import ValueContext, value_context
from ..settings import ScoringOptions
from . import assemble
from .targets import PROJECTION_TOKENS, TOP_HEADS_WITH_POSITIONS, target_info, token_info
from .queries import query_scores, summed_query_scores, value_neuron
from .result_memory import buffers_budget


def attribute_answer(model: LoadedModel, prompt: Prompt, answer: str | int | list[int] | None,
                     options: ScoringOptions) -> Attribution:
    """Value (and query) neurons of every token of `answer` (text, or a list of token ids)."""
    if answer is None:
        raise UserError("answer_tokens='all' needs the answer (text or token ids), not the top prediction")
    ids = encode_prompt(model, prompt)
    answer_ids = encode_answer(model, ids, prompt, answer)
    prefixes = [ids + answer_ids[:i] for i in range(len(answer_ids))]
    traces = trace_token_ids(model, prefixes)
    buffers = buffers_budget(model.shape, len(prefixes[-1]), max(options.top_k, options.query_top),
                             options.memory_budget, model.adapter.unembedding[0].shape[0], model.adapter.device)
    contexts = [value_context(model, trace, token, reference=options.reference, memory_budget=buffers,
                              budget_fixed=options.budget_fixed)
                for trace, token in zip(traces, answer_ids)]
    tokens = token_texts(model, prefixes[-1])
    scores = answer_scores(contexts, max(options.top_k, options.query_top), TOP_HEADS_WITH_POSITIONS,
                           PROJECTION_TOKENS)
    target = target_info(model, prompt, ids, traces[0], answer_ids[0])
    target.tokens = [token_info(torch.softmax(trace.logits.double(), dim=-1), token, token_texts(model, [token])[0])
                     for trace, token in zip(traces, answer_ids)]
    target.n_answer_tokens = len(answer_ids)
    target.answer = "".join(token_texts(model, answer_ids)) if len(answer_ids) > 1 else None
    ffn_neurons = assemble.ffn_neurons(model, scores.ffn, contexts[0].ffn_coefficients)
    attention_neurons = assemble.attention_neurons(model, scores.attention, len(tokens), tokens,
                                                   lambda index: _first_coefficient(contexts, index))
    for n in ffn_neurons:
        row = model.shape.ffn_row(n.index)
        n.token_coefficients = [float(c.ffn_coefficients[n.layer, row]) for c in contexts]
    for a in attention_neurons:
        a.token_coefficients = [float(c.attention_coefficients[a.index]) if a.position < c.trace.n_tokens else None
                                for c in contexts]
    queries = None
    if options.query_top:
        queries = summed_query_scores([
            query_scores(model, c.trace, [value_neuron(model.shape, n, n.token_scores[i])
                                          for n in ffn_neurons[: options.query_top]],
                         [query.AttentionValueNeuron(n.layer, n.head, n.dim, n.position, n.token_scores[i])
                          for n in attention_neurons[: options.query_top] if n.position < c.trace.n_tokens],
                         options.query_via)
            for i, c in enumerate(contexts)])
    return assemble.attribution_of(
        model, prompt, ids, tokens, target, traces[0].logits, scores.layers,
        assemble.HeadScores(scores.heads, scores.position_heads, scores.positions), ffn_neurons, attention_neurons,
        queries, options, {"ffn": scores.ffn.n_evaluated, "attention": scores.attention.n_evaluated},
        contexts[0].readout.unembedding.shape[0])


def _first_coefficient(contexts: list[ValueContext], index: AttentionIndex) -> float:
    """An attention neuron's coefficient at the first predicting position that sees its source position."""
    first = next(c for c in contexts if index.position < c.trace.n_tokens)
    return float(first.attention_coefficients[index])
