"""`attribute()`: value neurons, layer and head scores for one prompt, as a result object people can keep."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .loading import LoadedModel
from .output import write_json
from .prediction import Prediction, top_predictions
from .prompts import Prompt, encode_prompt, encode_target, token_texts
from .readout import LinearReadout
from .scoring import value
from .trace import Trace, trace_token_ids

PROJECTION_TOKENS = 10
TOP_HEADS_WITH_POSITIONS = 5


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
    reference: bool = False
    evaluated: dict[str, int] = field(default_factory=dict)  # neurons scored exactly, per kind
    dense: DenseScores | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "dense"}
        data["target"] = asdict(self.target)
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
            reference=data.get("reference", False), evaluated=data.get("evaluated", {}))

    @classmethod
    def load(cls, path: Path | str) -> Attribution:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read an attribution from {path}: {error}") from None


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise UserError(f"top_k must be a positive whole number, got {top_k!r}")


def readout_for(model: LoadedModel, trace: Trace, reference: bool = False) -> LinearReadout:
    unembedding, bias = model.adapter.unembedding
    return LinearReadout.at(model.adapter.final_norm(), unembedding, bias, trace.final_residual[-1],
                            reference=reference, max_unembedding_norm=model.adapter.max_unembedding_norm)


def value_context(model: LoadedModel, trace: Trace, target: int, reference: bool = False) -> value.ValueContext:
    adapter = model.adapter
    return value.ValueContext.build(trace, adapter.all_ffn_values, adapter.all_output_weights, model.shape,
                                    readout_for(model, trace, reference), target)


def attribute(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *, top_k: int = 100,
              dense: bool = False, reference: bool = False) -> Attribution:
    """Value neurons for one prompt: which FFN and attention neurons raise log p(target)."""
    return attribute_batch(model, [prompt], None if target is None else [target], top_k=top_k, dense=dense,
                           reference=reference)[0]


def attribute_batch(model: LoadedModel, prompts: Sequence[Prompt], targets: Sequence[str | int | None] | None = None,
                    *, top_k: int = 100, dense: bool = False, reference: bool = False,
                    batch_size: int = 8) -> list[Attribution]:
    """`attribute` for many prompts, sharing forward passes (right-padded batches of `batch_size`)."""
    _check_top_k(top_k)
    if targets is not None and len(targets) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [encode_prompt(model, p) for p in prompts]
    results = []
    for start in range(0, len(encoded), batch_size):
        traces = trace_token_ids(model, encoded[start: start + batch_size])
        for offset, trace in enumerate(traces):
            i = start + offset
            target = None if targets is None else targets[i]
            results.append(_attribute_trace(model, prompts[i], encoded[i], trace, target, top_k, dense, reference))
    return results


def _attribute_trace(model: LoadedModel, prompt: Prompt, ids: list[int], trace: Trace, target: str | int | None,
                     top_k: int, dense: bool, reference: bool) -> Attribution:
    if target is None:
        target_token = encode_target(model, ids, prompt, int(trace.logits.argmax()))
    else:
        target_token = encode_target(model, ids, prompt, target)
    ctx = value_context(model, trace, target_token.id, reference)
    tokens = token_texts(model, ids)
    probs = torch.softmax(trace.logits.double(), dim=-1)
    target_info = TargetInfo(target_token.text, target_token.id, float(probs[target_token.id]),
                             int((probs > probs[target_token.id]).sum()) + 1, target_token.n_answer_tokens)

    attention_layers, ffn_layers = value.layer_scores(ctx)
    heads = value.head_scores(ctx)
    head_list = [HeadScore(l, h, float(heads[l, h])) for l in range(heads.shape[0]) for h in range(heads.shape[1])]
    head_list.sort(key=lambda s: -s.score)
    top_heads = [(s.layer, s.head) for s in head_list[:TOP_HEADS_WITH_POSITIONS]]
    positions = value.head_position_scores(ctx, top_heads)
    head_positions = [HeadPositionScore(l, h, p, tokens[p], float(positions[i, p]))
                      for i, (l, h) in enumerate(top_heads) for p in range(positions.shape[1])]

    ffn_top = value.exact_top_k(value.ffn_bounds(ctx), lambda f: value.evaluate_ffn(ctx, f, PROJECTION_TOKENS),
                                top_k)
    attention_top = value.exact_top_k(value.attention_bounds(ctx),
                                      lambda f: (value.evaluate_attention(ctx, f), None), top_k)
    return Attribution(
        prompt=prompt if isinstance(prompt, str) else "".join(tokens),
        model=model.name,
        tokens=tokens,
        target=target_info,
        predictions=top_predictions(model, trace.logits, 10),
        layers=LayerScores(attention_layers.tolist(), ffn_layers.tolist()),
        heads=head_list,
        ffn_neurons=_ffn_neurons(model, ctx, ffn_top),
        attention_neurons=_attention_neurons(ctx, attention_top, tokens),
        head_positions=head_positions,
        reference=reference,
        evaluated={"ffn": ffn_top.n_evaluated, "attention": attention_top.n_evaluated},
        dense=_dense(ctx) if dense else None,
    )


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
    vector = _neuron_vector(model, neuron)
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


__all__ = ["AttentionNeuron", "Attribution", "FfnNeuron", "HeadScore", "Projection", "attribute",
           "attribute_batch", "project"]
