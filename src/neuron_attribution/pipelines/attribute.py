"""`attribute()`: value neurons, layer and head scores and query neurons for prompts (docs/method.md §2–3)."""

from __future__ import annotations

from collections.abc import Sequence


from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt, token_texts
from ..model.trace import Trace, trace_token_ids
from ..model.quantization import has_quantized_layers
from ..results.attribution import Attribution, DenseScores
from ..results.quantization import QuantizationResidual
from ..scoring import quantization, value
from ..scoring.context import ValueContext, value_context
from ..settings import ScoringOptions, check_positive
from . import assemble
from .answer import attribute_answer
from .measure import measure_attributions
from .queries import query_scores
from .result_memory import buffers_budget
from .targets import PROJECTION_TOKENS, TOP_HEADS_WITH_POSITIONS, Target, target_info



def attribute(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *,
              options: ScoringOptions | None = None, dense: bool = False, contrast: str | int | None = None,
              **scoring) -> Attribution:
    """Value neurons for one prompt: which FFN and attention neurons raise log p(target), and the query
    neurons and layers that activate the top `query_top` value neurons of each kind (0: no query scoring),
    scored through `query_via`: "attention" value neurons (the paper's method), "ffn" ones, or "both".
    `target`: answer text (its first token is scored), a token id, or None for the model's top prediction.
    `contrast` (answer text or token id): score log p(target) − log p(contrast) instead, "Paris rather than
    London" (docs/method.md §2). `dense`: every neuron's score too.

    The scoring options are `ScoringOptions`' fields, given as `options=` or one by one (`top_k=300`,
    `query_top`, `query_via`, `memory_budget`, `answer_tokens`, `rank_by`, `reference`; see `ScoringOptions`
    for what each means); one by one they override `options`. A `query_top` larger than the model's number of
    neurons of a kind is clamped to it. `answer_tokens="all"` scores every token of the answer by teacher
    forcing; `rank_by="direct"` ranks value neurons by the direct part of their score."""
    return attribute_batch(model, [prompt], None if target is None else [target], options=options, dense=dense,
                           contrasts=None if contrast is None else [contrast], **scoring)[0]


def attribute_batch(model: LoadedModel, prompts: Sequence[Prompt], targets: Sequence[str | int | None] | None = None,
                    *, options: ScoringOptions | None = None, dense: bool = False, batch_size: int = 8,
                    contrasts: Sequence[str | int | None] | None = None, **scoring) -> list[Attribution]:
    """`attribute` for many prompts, sharing forward passes (right-padded batches of `batch_size`); `contrasts`:
    one per prompt (None where a prompt has none)."""
    return attribute_with(model, prompts, targets, (options or ScoringOptions()).overridden(**scoring), dense=dense,
                          batch_size=batch_size, contrasts=contrasts)


def attribute_with(model: LoadedModel, prompts: Sequence[Prompt], targets: Sequence[str | int | None] | None,
                   options: ScoringOptions, *, dense: bool = False, batch_size: int = 8,
                   contrasts: Sequence[str | int | None] | None = None) -> list[Attribution]:
    """`attribute_batch` with the scoring options as one object (as settings carry them)."""
    check_positive("batch_size", batch_size)
    if isinstance(prompts, str):
        raise UserError("prompts must be a list of prompts, not one text; use attribute() for one prompt")
    for name, values in (("targets", targets), ("contrasts", contrasts)):
        if values is not None and len(values) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(values)} {name}")
    if options.answer_tokens == "all":
        if contrasts is not None and any(c is not None for c in contrasts):
            raise UserError("a contrast applies to a single answer token; use answer_tokens='first' with it")
        if dense:
            raise UserError("dense scores are for answer_tokens='first'")
        return [attribute_answer(model, p, None if targets is None else targets[i], options)
                for i, p in enumerate(prompts)]
    encoded = [encode_prompt(model, p) for p in prompts]
    results = []
    for start in range(0, len(encoded), batch_size):
        traces = trace_token_ids(model, encoded[start: start + batch_size])
        for offset, trace in enumerate(traces):
            i = start + offset
            target = None if targets is None else targets[i]
            contrast = None if contrasts is None else contrasts[i]
            results.append(attribute_trace(model, prompts[i], encoded[i], trace, target, options, dense, contrast))
    if options.measure:
        measure_attributions(model, results, encoded, options.measure, rerank=options.rank_by == "measured")
    return results


def attribute_trace(model: LoadedModel, prompt: Prompt, ids: list[int], trace: Trace, target: Target,
                    options: ScoringOptions, dense: bool = False, contrast: Target = None) -> Attribution:
    """One prompt's attribution from its trace (no measuring: `attribute_with` measures a batch together)."""
    buffers = buffers_budget(model.shape, trace.n_tokens, max(options.top_k, options.query_top), options.memory_budget,
                             model.adapter.unembedding[0].shape[0], model.adapter.device)
    target = target_info(model, prompt, ids, trace, target, contrast)
    ctx = value_context(model, trace, target.id, reference=options.reference, memory_budget=buffers,
                        contrast=None if target.contrast is None else target.contrast.id,
                        budget_fixed=options.budget_fixed)
    tokens = token_texts(model, ids)
    scores = value.value_scores(ctx, max(options.top_k, options.query_top), TOP_HEADS_WITH_POSITIONS,
                                PROJECTION_TOKENS, "score" if options.rank_by == "measured" else options.rank_by)
    layers = value.layer_scores(ctx)  # after the first product, which read the bases it differences
    ffn_neurons = assemble.ffn_neurons(model, scores.ffn, ctx.ffn_coefficients)
    attention_neurons = assemble.attention_neurons(model, scores.attention, ctx.trace.n_tokens, tokens,
                                                   lambda index: float(ctx.attention_coefficients[index]))
    queries = query_scores(model, trace, ffn_neurons[: options.query_top], attention_neurons[: options.query_top],
                           options.query_via) if options.query_top else None
    result = assemble.attribution_of(
        model, prompt, ids, tokens, target, trace.logits, layers,
        assemble.HeadScores(scores.heads, scores.position_heads, scores.positions, scores.head_direct), ffn_neurons,
        attention_neurons, queries, options, {"ffn": scores.ffn.n_evaluated, "attention": scores.attention.n_evaluated},
        ctx.readout.unembedding.shape[0], _dense(ctx) if dense else None, value.layer_direct_parts(ctx))
    if has_quantized_layers(model.hf_model):
        result.quantization_residuals = quantization_residuals(model, ctx)
    return result


def quantization_residuals(model: LoadedModel, ctx: ValueContext) -> list[QuantizationResidual]:
    """Every sublayer's quantisation residual at the last position, attention then FFN per layer."""
    weights = [model.adapter.layer_weights(layer) for layer in range(model.shape.n_layers)]
    vectors = quantization.residual_vectors(ctx, [quantization.SublayerBiases(w.output_bias, w.ffn_bias)
                                                  for w in weights])
    attention_scores, ffn_scores = quantization.residual_scores(ctx, vectors)
    found = []
    for layer in range(model.shape.n_layers):
        for component, residual, output, score in (
                ("attention", vectors.attention, vectors.attention_outputs, attention_scores),
                ("ffn", vectors.ffn, vectors.ffn_outputs, ffn_scores)):
            norm = float(residual[layer].norm())
            found.append(QuantizationResidual(layer, component, norm, norm / max(float(output[layer].norm()), 1e-30),
                                              float(score[layer])))
    return found


def _dense(ctx: ValueContext) -> DenseScores:
    return DenseScores(value.dense_ffn_scores(ctx).cpu().numpy(), value.dense_attention_scores(ctx).cpu().numpy())
