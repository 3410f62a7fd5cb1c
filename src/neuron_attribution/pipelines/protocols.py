"""Evaluation protocols (docs/method.md §5), one class each, registered by defining them: `evaluate` looks
them up by key, and the CLI takes its `--protocol` choices and help from here.

* compare — per sentence, each method's top-N FFN neurons are zeroed (the paper's method-comparison table);
* value — the top attention (2/3) and FFN (1/3) value neurons, 300 by default, against as many random ones;
* query — the top query FFN neurons, 1000 by default, against as many random FFN neurons;
* heads — the top 1% of heads of each knowledge type, measured on every type, against random heads.

Every sentence is traced once; the ablated runs go in padded batches with a different intervention per row.
Batch functions run wherever the backend puts them and take (model, settings, work).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..execution import Backend
from ..registry import Registry
from ..model.interventions import Ablation, last_logits_each
from ..model.loaded import LoadedModel
from ..model.prompts import Sentence
from ..model.trace import trace_token_ids
from ..neurons import HeadIndex
from ..results.evaluation import Evaluation
from ..results.metrics import GoldScores, Metrics
from ..scoring import query, value
from ..scoring.context import ValueContext, value_context
from ..scoring.methods import METHODS, FfnScorer, MethodResources, create_scorers
from ..scoring.methods.baselines import sentence_seed
from ..scoring.ranks import ranks_for
from ..scoring.topk import rank_by_score
from ..settings import DEFAULT_IG_STEPS, Settings
from .queries import query_scores

Progress = Callable[[str, int, int], None]  # (what, done, total)
HEAD_FRACTION = 0.01  # heads protocol: the top 1% of heads of a type

# key -> protocol class, in the order defined
PROTOCOLS: Registry[type[EvaluationProtocol]] = Registry("evaluation protocols")


@dataclass(frozen=True)
class Request:
    """One protocol's options, as every batch needs them (picklable, so a worker can do its part)."""

    protocol: str
    top: int | None  # None: the protocol's default
    methods: tuple[str, ...] = ()
    seed: int = 0
    ig_steps: int = DEFAULT_IG_STEPS


class EvaluationProtocol(ABC):
    key: ClassVar[str]
    description: ClassVar[str]
    default_top: ClassVar[int | None]  # None: computed from the model (heads: 1% of them)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "key" in cls.__dict__:
            PROTOCOLS.register(cls.key, cls)

    @abstractmethod
    def evaluate(self, model: LoadedModel, backend: Backend, sentences: list[Sentence],
                 batches: list[list[Sentence]], request: Request, report: Progress) -> Evaluation:
        """Run the protocol over the sentences (already split into batches). `model` is the driver's copy,
        for its name and shape; the batches run on the backend's."""


def gathered(backend: Backend, function, works: list, sizes: list[int], what: str, report: Progress) -> list:
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


# --- protocols that switch off per-sentence neurons, each row against the unablated model -------------------

class AblationProtocol(EvaluationProtocol):
    what: ClassVar[str]  # progress text

    @abstractmethod
    def ablations(self, model: LoadedModel, settings: Settings, request: Request
                  ) -> Callable[[Sentence, ValueContext], dict[str, Ablation]]:
        """A function giving each sentence's row key -> what that row switches off."""

    def prepare(self, backend: Backend, request: Request, report: Progress) -> None:
        """One-off work on every copy of the model before the batches (nothing by default)."""

    def evaluate(self, model: LoadedModel, backend: Backend, sentences: list[Sentence],
                 batches: list[list[Sentence]], request: Request, report: Progress) -> Evaluation:
        self.prepare(backend, request, report)
        parts = gathered(backend, ablation_batch, [(request, batch) for batch in batches],
                         [len(batch) for batch in batches], self.what, report)
        base = Metrics.of(GoldScores.concat([p["original"] for p in parts]))
        rows = [key for key in parts[0] if key != "original"]
        methods = {"original": base} | {key: Metrics.of(GoldScores.concat([p[key] for p in parts]), base)
                                        for key in rows}
        return Evaluation(self.key, model.name, request.top or self.default_top, len(sentences), methods)


def ablation_batch(model: LoadedModel, settings: Settings, work: tuple[Request, list[Sentence]]
                   ) -> dict[str, GoldScores]:
    """One batch of an ablation protocol: trace the sentences, find what each row switches off, run them all;
    the gold token's scores, unablated ("original") and per row key."""
    request, sentences = work
    protocol = PROTOCOLS[request.protocol]()
    traces = trace_token_ids(model, [s.ids for s in sentences])
    gold = _gold(sentences)
    make = protocol.ablations(model, settings, request)
    ids, ablations, keys = [], [], []
    for sentence, trace in zip(sentences, traces):
        ctx = value_context(model, trace, sentence.target, memory_budget=settings.scoring.memory_budget)
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


def _prepare_ranks(model: LoadedModel, settings: Settings, progress: Callable[[int, int], None] | None) -> None:
    ranks_for(model).prepare(progress)


def _gold(sentences: list[Sentence]) -> Tensor:
    return torch.tensor([s.target for s in sentences], device="cpu")


def _rows_of_type(sentences: list[Sentence], kind: str | None) -> Tensor:
    return torch.tensor([i for i, s in enumerate(sentences) if s.type == kind], device="cpu")


def _random_order(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n), drawn on the CPU: the same seed picks the same neurons whatever device
    the scores are computed on."""
    return torch.randperm(n, generator=generator, device="cpu")


def _generator(seed: int, sentence: Sentence) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sentence_seed(seed, sentence.ids, sentence.target))


class Compare(AblationProtocol):
    key = "compare"
    description = "each method's top FFN neurons switched off (the paper's method comparison)"
    default_top = 10
    what = "switching off each method's top neurons"

    def prepare(self, backend: Backend, request: Request, report: Progress) -> None:
        if any(METHODS[key].needs_ranks for key in request.methods):
            backend.on_every_model(_prepare_ranks, lambda done, total: report(
                "projecting every FFN value vector", done, total))

    def ablations(self, model, settings, request):
        top = request.top or self.default_top
        scorers: dict[str, FfnScorer] = create_scorers(request.methods,
                                                       MethodResources(model, request.seed, request.ig_steps))
        return lambda sentence, ctx: {key: Ablation(ffn=model.shape.ffn_indices(scorer.top(ctx, top)))
                                      for key, scorer in scorers.items()}


class ValueNeurons(AblationProtocol):
    key = "value"
    description = "the top value neurons (2/3 attention, 1/3 FFN) vs as many random ones"
    default_top = 300
    what = "switching off value neurons"

    @staticmethod
    def split(top: int) -> tuple[int, int]:
        """(attention, FFN) value neurons switched off for `top` in all: two thirds attention, as the paper's
        200 + 100."""
        n_attention = round(top * 2 / 3)
        return n_attention, top - n_attention

    def ablations(self, model, settings, request):
        n_attention, n_ffn = self.split(request.top or self.default_top)
        s = model.shape

        def make(sentence: Sentence, ctx: ValueContext) -> dict[str, Ablation]:
            n_tokens = ctx.trace.n_tokens
            ffn, attention = value.top_ffn(ctx, n_ffn), value.top_attention(ctx, n_attention)
            generator = _generator(request.seed, sentence)
            random_ffn = _random_order(s.n_layers * s.d_ffn, generator)[:n_ffn]
            random_attention = _random_order(math.prod(s.attention_grid(n_tokens)), generator)[:n_attention]
            return {"value": Ablation(ffn=s.ffn_indices(ffn.indices),
                                      attention_at=s.attention_indices(attention.indices, n_tokens)),
                    "random": Ablation(ffn=s.ffn_indices(random_ffn),
                                       attention_at=s.attention_indices(random_attention, n_tokens))}
        return make


class QueryNeurons(AblationProtocol):
    key = "query"
    description = "the top query FFN neurons vs as many random FFN neurons"
    default_top = 1000
    what = "switching off query neurons"

    def ablations(self, model, settings, request):
        top, k, s = request.top or self.default_top, settings.scoring.query_top, model.shape

        def make(sentence: Sentence, ctx: ValueContext) -> dict[str, Ablation]:
            n_tokens = ctx.trace.n_tokens
            ffn, attention = value.top_ffn(ctx, k), value.top_attention(ctx, k)
            ffn_neurons = [query.FfnValueNeuron(index.layer, s.ffn_row(index), float(score), str(index))
                           for index, score in zip(s.ffn_indices(ffn.indices), ffn.scores)]
            attention_neurons = [query.AttentionValueNeuron(*index, float(score)) for index, score
                                 in zip(s.attention_indices(attention.indices, n_tokens), attention.scores)]
            total = query_scores(model, ctx.trace, ffn_neurons, attention_neurons,
                                 settings.scoring.query_via).total.reshape(-1)
            best = rank_by_score(total)[:top]
            random_ffn = _random_order(s.n_layers * s.d_ffn, _generator(request.seed, sentence))[:top]
            return {"query": Ablation(ffn=s.ffn_indices(best)), "random": Ablation(ffn=s.ffn_indices(random_ffn))}
        return make


# --- heads: score them all, choose per type, then switch them off ------------------------------------------

def head_scores_batch(model: LoadedModel, settings: Settings, sentences: list[Sentence]) -> tuple[GoldScores, Tensor]:
    """The unablated gold scores and every head's score, (n, L, H), for one batch."""
    traces = trace_token_ids(model, [s.ids for s in sentences])
    gold = _gold(sentences)
    heads = torch.stack([value.head_scores(value_context(model, trace, s.target,
                                                         memory_budget=settings.scoring.memory_budget))
                         for s, trace in zip(sentences, traces)]).cpu()
    return GoldScores.of(torch.stack([t.logits for t in traces]), gold), heads


def heads_ablation_batch(model: LoadedModel, settings: Settings,
                         work: tuple[dict[str, list[HeadIndex]], list[Sentence]]) -> dict[str, GoldScores]:
    """The gold scores of one batch with each named set of heads switched off in turn."""
    runs, sentences = work
    gold = _gold(sentences)
    ids = [s.ids for s in sentences]
    return {key: GoldScores.of(last_logits_each(model, ids, [Ablation(heads=heads)] * len(ids), batch_size=16), gold)
            for key, heads in runs.items()}


class Heads(EvaluationProtocol):
    key = "heads"
    description = "the top 1% of heads of each knowledge type, measured on every type, vs random heads"
    default_top = None

    def evaluate(self, model, backend, sentences, batches, request, report):
        sizes = [len(batch) for batch in batches]
        scored = gathered(backend, head_scores_batch, batches, sizes, "scoring heads", report)
        original = GoldScores.concat([g for g, _ in scored])
        heads = torch.cat([h for _, h in scored])  # (n, L, H)
        n_layers, n_heads = heads.shape[1:]
        count = request.top or max(1, round(HEAD_FRACTION * n_layers * n_heads))
        types = sorted({s.type for s in sentences})
        chosen = {}
        for kind in types:
            rows = _rows_of_type(sentences, kind)
            mean = heads[rows].mean(dim=0).reshape(-1)
            chosen[kind] = model.shape.head_indices(rank_by_score(mean)[:count])
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        chosen_random = model.shape.head_indices(_random_order(n_layers * n_heads, generator)[:count])
        runs = {f"heads:{kind}": chosen[kind] for kind in types} | {"random": chosen_random}
        parts = gathered(backend, heads_ablation_batch, [(runs, batch) for batch in batches], sizes,
                         "switching off each type's top heads", report)
        scores = {key: GoldScores.concat([p[key] for p in parts]) for key in runs}
        base = Metrics.of(original)
        result = Evaluation("heads", model.name, count, len(sentences),
                            {"original": base} | {key: Metrics.of(s, base) for key, s in scores.items()})
        by_type: dict[str, dict[str, Metrics]] = {}
        for key in runs:
            ablated = key.removeprefix("heads:")
            by_type[ablated] = {}
            for kind in types:
                rows = _rows_of_type(sentences, kind)
                by_type[ablated][kind] = Metrics.of(scores[key].subset(rows), Metrics.of(original.subset(rows)))
        result.by_type = by_type
        result.heads = {kind: [tuple(h) for h in hs] for kind, hs in {**chosen, "random": chosen_random}.items()}
        return result
