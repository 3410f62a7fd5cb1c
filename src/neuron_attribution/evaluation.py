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
from .interventions import Ablation, last_logits_each
from .loading import LoadedModel
from .metrics import GoldScores, Metrics
from .output import write_json
from .prompts import encode_prompt, encode_target
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


@dataclass(frozen=True)
class Sentence:
    fact: Fact
    ids: list[int]
    target: int

    @property
    def type(self) -> str:
        return self.fact.type or "all"


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


def prepare_sentences(model: LoadedModel, facts: Sequence[Fact], on_error: OnError = "skip"
                      ) -> tuple[list[Sentence], list[Skipped]]:
    """Token ids of each fact's prompt and answer; facts the model cannot take are skipped (or stop the run)."""
    sentences, skipped = [], []
    for fact in facts:
        try:
            ids = encode_prompt(model, fact.prompt)
            target = encode_target(model, ids, fact.prompt, fact.answer).id
        except UserError as error:
            if on_error == "stop":
                raise UserError(f"{fact.source}:{fact.line}: {error}") from None
            skipped.append(Skipped(fact.source, fact.line, str(error), fact.prompt))
            continue
        sentences.append(Sentence(fact, ids, target))
    return sentences, skipped


def evaluate(model: LoadedModel, facts: Sequence[Fact], *, protocol: str = "compare",
             methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
             batch_size: int = 8, on_error: OnError = "skip", skipped: Sequence[Skipped] = (),
             progress: Progress | None = None, ig_steps: int = 20) -> Evaluation:
    """Run one protocol over `facts`. `skipped`: lines already left out while reading them (reported)."""
    started = time.perf_counter()
    sentences, left_out = prepare_sentences(model, facts, on_error)
    all_skipped = [*skipped, *left_out]
    if not sentences:
        raise UserError(f"no usable sentences ({len(all_skipped)} skipped)")
    result = evaluate_sentences(model, sentences, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, progress=progress, ig_steps=ig_steps)
    result.skipped = all_skipped
    result.seconds = time.perf_counter() - started
    return result


def evaluate_sentences(model: LoadedModel, sentences: Sequence[Sentence], *, protocol: str = "compare",
                       methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
                       batch_size: int = 8, progress: Progress | None = None, ig_steps: int = 20) -> Evaluation:
    """`evaluate` for sentences already tokenised."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if top is not None and top <= 0:
        raise UserError("--top must be a positive number")
    if batch_size <= 0:
        raise UserError("--batch-size must be a positive number")
    if not sentences:
        raise UserError("no sentences to evaluate")
    started = time.perf_counter()
    runner = _Runner(model, list(sentences), batch_size, seed, progress or (lambda what, done, total: None))
    if protocol == "compare":
        result = runner.compare(resolve_methods(methods), top or DEFAULT_TOP["compare"], ig_steps)
    elif protocol == "value":
        result = runner.value_protocol(top or DEFAULT_TOP["value"])
    elif protocol == "query":
        result = runner.query_protocol(top or DEFAULT_TOP["query"])
    else:
        result = runner.heads_protocol(top)
    result.seconds = time.perf_counter() - started
    return result


class _Runner:
    def __init__(self, model: LoadedModel, sentences: list[Sentence], batch_size: int, seed: int,
                 progress: Progress):
        self.model, self.sentences, self.batch_size, self.seed = model, sentences, batch_size, seed
        self.progress = progress
        self.gold = torch.tensor([s.target for s in sentences])

    # --- shared steps -----------------------------------------------------------------------------------
    def _batches(self):
        for start in range(0, len(self.sentences), self.batch_size):
            batch = self.sentences[start: start + self.batch_size]
            yield start, batch, trace_token_ids(self.model, [s.ids for s in batch])

    def _ablate_all(self, what: str, make: Callable[[int, Sentence, value.ValueContext], dict[str, Ablation]]
                    ) -> tuple[GoldScores, dict[str, GoldScores]]:
        """Trace every sentence, ask `make` for the ablations of each (by row key), run them all; returns the
        original scores and each key's scores, sentences in order."""
        original: list[Tensor] = []
        ablated: dict[str, list[Tensor]] = defaultdict(list)
        self.progress(what, 0, len(self.sentences))
        for start, batch, traces in self._batches():
            ids, ablations, keys = [], [], []
            for offset, (sentence, trace) in enumerate(zip(batch, traces)):
                original.append(trace.logits)
                ctx = value_context(self.model, trace, sentence.target)
                for key, ablation in make(start + offset, sentence, ctx).items():
                    ids.append(sentence.ids)
                    ablations.append(ablation)
                    keys.append(key)
            logits = last_logits_each(self.model, ids, ablations, batch_size=16)
            for key, row in zip(keys, logits):
                ablated[key].append(row)
            self.progress(what, start + len(batch), len(self.sentences))
        return (GoldScores.of(torch.stack(original), self.gold),
                {key: GoldScores.of(torch.stack(rows), self.gold) for key, rows in ablated.items()})

    def _result(self, protocol: str, top: int, original: GoldScores, ablated: dict[str, GoldScores]) -> Evaluation:
        base = Metrics.of(original)
        methods = {"original": base, **{key: Metrics.of(s, base) for key, s in ablated.items()}}
        return Evaluation(protocol, self.model.name, top, len(self.sentences), methods)

    def _generator(self, sentence: Sentence) -> torch.Generator:
        return torch.Generator().manual_seed(sentence_seed(self.seed, torch.tensor(sentence.ids), sentence.target))

    def _ffn_pairs(self, flat: Tensor) -> list[tuple[int, int]]:
        n = self.model.shape.d_ffn
        return [divmod(int(f), n) for f in flat.tolist()]

    # --- protocols ----------------------------------------------------------------------------------------
    def compare(self, keys: list[str], top: int, ig_steps: int) -> Evaluation:
        scorers = self._scorers(keys, ig_steps)

        def make(index: int, sentence: Sentence, ctx: value.ValueContext) -> dict[str, Ablation]:
            return {key: Ablation(ffn=self._ffn_pairs(scorer.top(ctx, top))) for key, scorer in scorers.items()}

        original, ablated = self._ablate_all("switching off each method's top neurons", make)
        return self._result("compare", top, original, {key: ablated[key] for key in keys})

    def _scorers(self, keys: list[str], ig_steps: int) -> dict[str, FfnScorer]:
        ranks = None
        if {"rank", "coefficient_x_rank"} & set(keys):
            adapter = self.model.adapter
            norm = adapter.final_norm()
            ranks = VocabularyRanks(adapter.all_ffn_values, norm.weight, norm.kind == "layernorm",
                                    adapter.unembedding[0])
            ranks.prepare(lambda done, total: self.progress("projecting every FFN value vector", done, total))
        available: dict[str, FfnScorer] = static_scorers(ranks, self.seed)
        if "integrated_gradients" in keys:
            available["integrated_gradients"] = IntegratedGradients(self.model, ig_steps)
        return {key: available[key] for key in keys}

    def value_protocol(self, top: int) -> Evaluation:
        n_attention = round(top * 2 / 3)
        n_ffn = top - n_attention
        s = self.model.shape

        def make(index: int, sentence: Sentence, ctx: value.ValueContext) -> dict[str, Ablation]:
            ffn = value.exact_top_k(value.ffn_bounds(ctx), lambda f: value.evaluate_ffn(ctx, f), n_ffn)
            attention = value.exact_top_k(value.attention_bounds(ctx),
                                          lambda f: (value.evaluate_attention(ctx, f), None), n_attention)
            generator = self._generator(sentence)
            random_ffn = torch.randperm(s.n_layers * s.d_ffn, generator=generator)[:n_ffn]
            shape = ctx.attention_coefficients.shape
            random_attention = torch.randperm(math.prod(shape), generator=generator)[:n_attention]
            return {"value": Ablation(ffn=self._ffn_pairs(ffn.indices),
                                      attention_at=self._attention_at(attention.indices, shape)),
                    "random": Ablation(ffn=self._ffn_pairs(random_ffn),
                                       attention_at=self._attention_at(random_attention, shape))}

        original, ablated = self._ablate_all("switching off value neurons", make)
        return self._result("value", top, original, ablated)

    @staticmethod
    def _attention_at(flat: Tensor, shape: torch.Size) -> list[tuple[int, int, int, int]]:
        unravelled = torch.stack(torch.unravel_index(flat, shape), dim=-1)
        return [tuple(row) for row in unravelled.tolist()]

    def query_protocol(self, top: int) -> Evaluation:
        s = self.model.shape

        def make(index: int, sentence: Sentence, ctx: value.ValueContext) -> dict[str, Ablation]:
            k = QUERY_VALUE_NEURONS
            ffn = value.exact_top_k(value.ffn_bounds(ctx), lambda f: value.evaluate_ffn(ctx, f), k)
            attention = value.exact_top_k(value.attention_bounds(ctx),
                                          lambda f: (value.evaluate_attention(ctx, f), None), k)
            ffn_neurons = [query.FfnValueNeuron(layer, neuron, float(score)) for (layer, neuron), score
                           in zip(self._ffn_pairs(ffn.indices), ffn.scores)]
            shape = ctx.attention_coefficients.shape
            attention_neurons = [query.AttentionValueNeuron(*where, float(score)) for where, score
                                 in zip(self._attention_at(attention.indices, shape), attention.scores)]
            total = query_scores(self.model, ctx.trace, ffn_neurons, attention_neurons).total.reshape(-1)
            best = rank_by_score(total, torch.arange(total.numel()))[:top]
            random_ffn = torch.randperm(s.n_layers * s.d_ffn, generator=self._generator(sentence))[:top]
            return {"query": Ablation(ffn=self._ffn_pairs(best)), "random": Ablation(ffn=self._ffn_pairs(random_ffn))}

        original, ablated = self._ablate_all("switching off query neurons", make)
        return self._result("query", top, original, ablated)

    def heads_protocol(self, top: int | None) -> Evaluation:
        s = self.model.shape
        count = top or max(1, round(HEAD_FRACTION * s.n_layers * s.n_heads))
        totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros(s.n_layers, s.n_heads))
        sizes: dict[str, int] = defaultdict(int)
        original: list[Tensor] = []
        self.progress("scoring heads", 0, len(self.sentences))
        for start, batch, traces in self._batches():
            for sentence, trace in zip(batch, traces):
                original.append(trace.logits)
                totals[sentence.type] += value.head_scores(value_context(self.model, trace, sentence.target))
                sizes[sentence.type] += 1
            self.progress("scoring heads", start + len(batch), len(self.sentences))
        types = sorted(totals)
        chosen = {}
        for kind in types:
            mean = (totals[kind] / sizes[kind]).reshape(-1)
            best = rank_by_score(mean, torch.arange(mean.numel()))[:count]
            chosen[kind] = [divmod(int(i), s.n_heads) for i in best]
        generator = torch.Generator().manual_seed(self.seed)
        chosen_random = [divmod(int(i), s.n_heads) for i in torch.randperm(s.n_layers * s.n_heads,
                                                                              generator=generator)[:count]]
        ids = [sentence.ids for sentence in self.sentences]
        runs = {f"heads:{kind}": chosen[kind] for kind in types} | {"random": chosen_random}
        scores = {}
        for done, (key, heads) in enumerate(runs.items()):
            self.progress("switching off each type's top heads", done, len(runs))
            logits = last_logits_each(self.model, ids, [Ablation(heads=heads)] * len(ids), batch_size=16)
            scores[key] = GoldScores.of(logits, self.gold)
        self.progress("switching off each type's top heads", len(runs), len(runs))
        original_scores = GoldScores.of(torch.stack(original), self.gold)
        result = self._result("heads", count, original_scores, scores)
        by_type: dict[str, dict[str, Metrics]] = {}
        for key in runs:
            by_type[key.removeprefix("heads:")] = {}
            for kind in types:
                rows = torch.tensor([i for i, sen in enumerate(self.sentences) if sen.type == kind])
                base = Metrics.of(original_scores.subset(rows))
                by_type[key.removeprefix("heads:")][kind] = Metrics.of(scores[key].subset(rows), base)
        result.by_type = by_type
        result.heads = {**chosen, "random": chosen_random}
        return result
