"""`evaluate`: switch off the neurons a method finds and measure the gold token (METHOD.md §5).

Protocols:
* compare — per sentence, each method's top-N FFN neurons are zeroed (the paper's method-comparison table);
* value — the top attention (2/3) and FFN (1/3) value neurons, 300 by default, against as many random ones;
* query — the top query FFN neurons, 1000 by default, against as many random FFN neurons;
* heads — the top 1% of heads of each knowledge type, measured on every type, against random heads.

Every sentence is traced once; the ablated runs go in padded batches with a different intervention per row.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .attribution import QUERY_VALUE_NEURONS, query_scores, value_context
from .datasets import Fact, OnError, Skipped
from .errors import UserError
from .gradients import IntegratedGradients
from .execution import Backend, LocalBackend
from .interventions import Ablation, last_logits_each
from .loading import LoadedModel
from .metrics import GoldScores, Metrics
from .output import write_json
from .prompts import Sentence, encode_facts
from .scoring import query, value
from .scoring.baselines import STATIC_KEYS, FfnScorer, VocabularyRanks, sentence_seed, static_scorers
from .scoring.value import rank_by_score
from .trace import trace_token_ids

PROTOCOLS = ("compare", "value", "query", "heads")
DEFAULT_TOP = {"compare": 10, "value": 300, "query": 1000}
HEAD_FRACTION = 0.01  # heads protocol: the top 1% of heads of a type
ALL_METHODS = (*STATIC_KEYS, "random")
KNOWN_METHODS = (*ALL_METHODS, "integrated_gradients")

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class Evaluation:
    protocol: str
    model: str
    top: int  # neurons (heads, for the heads protocol) switched off per sentence and method
    n_sentences: int
    methods: dict[str, Metrics]  # "original" first
    skipped: list[Skipped] = field(default_factory=list)
    by_type: dict[str, dict[str, Metrics]] | None = None  # heads: ablated type -> measured type -> metrics
    heads: dict[str, list[tuple[int, int]]] | None = None  # heads: the heads switched off per type
    seconds: float = 0.0

    def to_dict(self) -> dict:
        payload = {
            "n_sentences": self.n_sentences,
            "top": self.top,
            "model": self.model,
            "protocol": self.protocol,
            "methods": {key: _metrics_dict(m) for key, m in self.methods.items()},
            "n_skipped": len(self.skipped),
            "skipped": [s.to_dict() for s in self.skipped],
            "seconds": round(self.seconds, 2),
        }
        if self.by_type is not None:
            payload["by_type"] = {a: {m: _metrics_dict(x) for m, x in row.items()} for a, row in self.by_type.items()}
        if self.heads is not None:
            payload["heads"] = {t: [list(h) for h in hs] for t, hs in self.heads.items()}
        return payload

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_dict())


def _metrics_dict(m: Metrics) -> dict:
    return {"mrr": m.mrr, "prob": m.prob, "log_prob": m.log_prob, "mrr_decrease": m.mrr_decrease,
            "prob_decrease": m.prob_decrease, "log_prob_drop": m.log_prob_drop}


def resolve_methods(spec: str | Sequence[str] | None) -> list[str]:
    """Method keys from "all", "a,b" or a list; "all" is every static method and the random control
    (integrated gradients, which runs the model again, only when named)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or ["all"])
    keys: list[str] = []
    for name in (n.strip() for n in names):
        expanded = ALL_METHODS if name == "all" else (name,)
        for key in expanded:
            if key not in KNOWN_METHODS:
                raise UserError(f"unknown method {key!r}; known: all, {', '.join(KNOWN_METHODS)}")
            if key not in keys:
                keys.append(key)
    if not keys:
        raise UserError("no method given")
    return keys


def evaluate(model: LoadedModel, facts: Sequence[Fact], *, protocol: str = "compare",
             methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
             batch_size: int = 8, on_error: OnError = "skip", skipped: Sequence[Skipped] = (),
             progress: Progress | None = None, ig_steps: int = 20, backend: Backend | None = None) -> Evaluation:
    """Run one protocol over `facts`. `skipped`: lines already left out while reading them (reported)."""
    started = time.perf_counter()
    sentences, left_out = encode_facts(model, facts, on_error)
    all_skipped = [*skipped, *left_out]
    if not sentences:
        raise UserError(f"no usable sentences ({len(all_skipped)} skipped)")
    result = evaluate_sentences(model, sentences, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, progress=progress, ig_steps=ig_steps, backend=backend)
    result.skipped = all_skipped
    result.seconds = time.perf_counter() - started
    return result


def evaluate_sentences(model: LoadedModel, sentences: Sequence[Sentence], *, protocol: str = "compare",
                       methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
                       batch_size: int = 8, progress: Progress | None = None, ig_steps: int = 20,
                       backend: Backend | None = None) -> Evaluation:
    """`evaluate` for sentences already tokenised. `backend`: where the batches run (default: here)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if top is not None and top <= 0:
        raise UserError("--top must be a positive number")
    if batch_size <= 0:
        raise UserError("--batch-size must be a positive number")
    if not sentences:
        raise UserError("no sentences to evaluate")
    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)
    backend = backend or LocalBackend(model)
    sentences = list(sentences)
    batches = [sentences[i: i + batch_size] for i in range(0, len(sentences), batch_size)]
    if protocol == "heads":
        result = _heads_protocol(model.name, backend, sentences, batches, top, seed, report)
    else:
        keys = tuple(resolve_methods(methods)) if protocol == "compare" else ()
        settings = Protocol(protocol, top or DEFAULT_TOP[protocol], keys, seed, ig_steps)
        if _needs_ranks(settings) and isinstance(backend, LocalBackend):
            _ranks_for(model).prepare(lambda done, total: report("projecting every FFN value vector", done, total))
        what = {"compare": "switching off each method's top neurons", "value": "switching off value neurons",
                "query": "switching off query neurons"}[protocol]
        parts = _gathered(backend, ablation_batch, [(settings, batch) for batch in batches],
                          [len(batch) for batch in batches], what, report)
        original = GoldScores.concat([p["original"] for p in parts])
        base = Metrics.of(original)
        rows = [key for key in parts[0] if key != "original"]
        methods_ = {"original": base} | {key: Metrics.of(GoldScores.concat([p[key] for p in parts]), base)
                                         for key in rows}
        result = Evaluation(protocol, model.name, settings.top, len(sentences), methods_)
    result.seconds = time.perf_counter() - started
    return result


def _gathered(backend: Backend, function, works: list, sizes: list[int], what: str, report: Progress) -> list:
    """Results of `function` on every work item, in order, reporting sentences done (`sizes` per item) as
    batches finish."""
    results: dict[int, object] = {}
    done = 0
    report(what, 0, sum(sizes))
    for index, result in backend.map(function, works):
        results[index] = result
        done += sizes[index]
        report(what, done, sum(sizes))
    return [results[i] for i in range(len(works))]


@dataclass(frozen=True)
class Protocol:
    """What each batch of sentences has to do for one protocol (picklable, so a worker can do it)."""

    name: str
    top: int
    methods: tuple[str, ...] = ()
    seed: int = 0
    ig_steps: int = 20


def ablation_batch(model: LoadedModel, work: tuple[Protocol, list[Sentence]]) -> dict[str, GoldScores]:
    """One batch of the compare, value or query protocol: trace the sentences, find what each row switches
    off, run them all; the gold token's scores, unablated ("original") and per row key."""
    settings, sentences = work
    traces = trace_token_ids(model, [s.ids for s in sentences])
    gold = torch.tensor([s.target for s in sentences])
    make = _ablations_for(model, settings)
    ids, ablations, keys = [], [], []
    for sentence, trace in zip(sentences, traces):
        ctx = value_context(model, trace, sentence.target)
        for key, ablation in make(sentence, ctx).items():
            ids.append(sentence.ids)
            ablations.append(ablation)
            keys.append(key)
    logits = last_logits_each(model, ids, ablations, batch_size=16)
    rows: dict[str, list[Tensor]] = defaultdict(list)
    for key, row in zip(keys, logits):
        rows[key].append(row)
    scores = {"original": GoldScores.of(torch.stack([t.logits for t in traces]), gold)}
    return scores | {key: GoldScores.of(torch.stack(r), gold) for key, r in rows.items()}


def _ablations_for(model: LoadedModel, settings: Protocol) -> Callable[[Sentence, value.ValueContext],
                                                                       dict[str, Ablation]]:
    if settings.name == "compare":
        scorers = _scorers(model, settings)
        return lambda sentence, ctx: {key: Ablation(ffn=_ffn_pairs(model, scorer.top(ctx, settings.top)))
                                      for key, scorer in scorers.items()}
    if settings.name == "value":
        return lambda sentence, ctx: _value_ablations(model, settings, sentence, ctx)
    return lambda sentence, ctx: _query_ablations(model, settings, sentence, ctx)


# Per model adapter, so the weight pass is done once per process; weak, so a dropped model takes its ranks
# along and a later model can never be handed them.
_RANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ranks_for(model: LoadedModel) -> VocabularyRanks:
    adapter = model.adapter
    if adapter not in _RANKS:
        norm = adapter.final_norm()
        _RANKS[adapter] = VocabularyRanks(adapter.all_ffn_values, norm.weight, norm.kind == "layernorm",
                                          adapter.unembedding[0])
    return _RANKS[adapter]


def _needs_ranks(settings: Protocol) -> bool:
    return bool({"rank", "coefficient_x_rank"} & set(settings.methods))


def _scorers(model: LoadedModel, settings: Protocol) -> dict[str, FfnScorer]:
    available: dict[str, FfnScorer] = static_scorers(_ranks_for(model) if _needs_ranks(settings) else None,
                                                     settings.seed)
    if "integrated_gradients" in settings.methods:
        available["integrated_gradients"] = IntegratedGradients(model, settings.ig_steps)
    return {key: available[key] for key in settings.methods}


def _ffn_pairs(model: LoadedModel, flat: Tensor) -> list[tuple[int, int]]:
    n = model.shape.d_ffn
    return [divmod(int(f), n) for f in flat.tolist()]


def _attention_at(flat: Tensor, shape: torch.Size) -> list[tuple[int, int, int, int]]:
    unravelled = torch.stack(torch.unravel_index(flat, shape), dim=-1)
    return [tuple(row) for row in unravelled.tolist()]


def _generator(seed: int, sentence: Sentence) -> torch.Generator:
    return torch.Generator().manual_seed(sentence_seed(seed, torch.tensor(sentence.ids), sentence.target))


def _value_ablations(model: LoadedModel, settings: Protocol, sentence: Sentence,
                     ctx: value.ValueContext) -> dict[str, Ablation]:
    """Top attention (2/3) and FFN (1/3) value neurons, against as many random ones of each kind."""
    n_attention = round(settings.top * 2 / 3)
    n_ffn = settings.top - n_attention
    s = model.shape
    ffn, attention = value.top_ffn(ctx, n_ffn), value.top_attention(ctx, n_attention)
    generator = _generator(settings.seed, sentence)
    random_ffn = torch.randperm(s.n_layers * s.d_ffn, generator=generator)[:n_ffn]
    shape = ctx.attention_coefficients.shape
    random_attention = torch.randperm(math.prod(shape), generator=generator)[:n_attention]
    return {"value": Ablation(ffn=_ffn_pairs(model, ffn.indices), attention_at=_attention_at(attention.indices, shape)),
            "random": Ablation(ffn=_ffn_pairs(model, random_ffn),
                               attention_at=_attention_at(random_attention, shape))}


def _query_ablations(model: LoadedModel, settings: Protocol, sentence: Sentence,
                     ctx: value.ValueContext) -> dict[str, Ablation]:
    """The top query FFN neurons of the top-30 value neurons of each kind, against as many random ones."""
    s, k = model.shape, QUERY_VALUE_NEURONS
    ffn, attention = value.top_ffn(ctx, k), value.top_attention(ctx, k)
    ffn_neurons = [query.FfnValueNeuron(layer, neuron, float(score))
                   for (layer, neuron), score in zip(_ffn_pairs(model, ffn.indices), ffn.scores)]
    shape = ctx.attention_coefficients.shape
    attention_neurons = [query.AttentionValueNeuron(*where, float(score))
                         for where, score in zip(_attention_at(attention.indices, shape), attention.scores)]
    total = query_scores(model, ctx.trace, ffn_neurons, attention_neurons).total.reshape(-1)
    best = rank_by_score(total, torch.arange(total.numel()))[: settings.top]
    random_ffn = torch.randperm(s.n_layers * s.d_ffn, generator=_generator(settings.seed, sentence))[: settings.top]
    return {"query": Ablation(ffn=_ffn_pairs(model, best)), "random": Ablation(ffn=_ffn_pairs(model, random_ffn))}


# --- heads: score them all, choose per type, then switch them off ------------------------------------------

def head_scores_batch(model: LoadedModel, sentences: list[Sentence]) -> tuple[GoldScores, Tensor]:
    """The unablated gold scores and every head's score, (n, L, H), for one batch."""
    traces = trace_token_ids(model, [s.ids for s in sentences])
    gold = torch.tensor([s.target for s in sentences])
    heads = torch.stack([value.head_scores(value_context(model, trace, s.target))
                         for s, trace in zip(sentences, traces)])
    return GoldScores.of(torch.stack([t.logits for t in traces]), gold), heads


def heads_ablation_batch(model: LoadedModel, work: tuple[dict[str, list[tuple[int, int]]], list[Sentence]]
                         ) -> dict[str, GoldScores]:
    """The gold scores of one batch with each named set of heads switched off in turn."""
    runs, sentences = work
    gold = torch.tensor([s.target for s in sentences])
    ids = [s.ids for s in sentences]
    return {key: GoldScores.of(last_logits_each(model, ids, [Ablation(heads=heads)] * len(ids), batch_size=16), gold)
            for key, heads in runs.items()}


def _heads_protocol(model_name: str, backend: Backend, sentences: list[Sentence], batches: list[list[Sentence]],
                    top: int | None, seed: int, report: Progress) -> Evaluation:
    sizes = [len(batch) for batch in batches]
    scored = _gathered(backend, head_scores_batch, batches, sizes, "scoring heads", report)
    original = GoldScores.concat([g for g, _ in scored])
    heads = torch.cat([h for _, h in scored])  # (n, L, H)
    n_layers, n_heads = heads.shape[1:]
    count = top or max(1, round(HEAD_FRACTION * n_layers * n_heads))
    types = sorted({s.type for s in sentences})
    chosen = {}
    for kind in types:
        rows = torch.tensor([i for i, s in enumerate(sentences) if s.type == kind])
        mean = heads[rows].mean(dim=0).reshape(-1)
        chosen[kind] = [divmod(int(i), n_heads) for i in rank_by_score(mean, torch.arange(mean.numel()))[:count]]
    generator = torch.Generator().manual_seed(seed)
    chosen_random = [divmod(int(i), n_heads) for i in torch.randperm(n_layers * n_heads, generator=generator)[:count]]
    runs = {f"heads:{kind}": chosen[kind] for kind in types} | {"random": chosen_random}
    parts = _gathered(backend, heads_ablation_batch, [(runs, batch) for batch in batches], sizes,
                      "switching off each type's top heads", report)
    scores = {key: GoldScores.concat([p[key] for p in parts]) for key in runs}
    base = Metrics.of(original)
    result = Evaluation("heads", model_name, count, len(sentences),
                        {"original": base} | {key: Metrics.of(s, base) for key, s in scores.items()})
    by_type: dict[str, dict[str, Metrics]] = {}
    for key in runs:
        ablated = key.removeprefix("heads:")
        by_type[ablated] = {}
        for kind in types:
            rows = torch.tensor([i for i, s in enumerate(sentences) if s.type == kind])
            by_type[ablated][kind] = Metrics.of(scores[key].subset(rows), Metrics.of(original.subset(rows)))
    result.by_type = by_type
    result.heads = {**chosen, "random": chosen_random}
    return result
