"""`analyze`: the paper's analyses (docs/method.md §7) on the tables of a finished run.

Per knowledge type: attention vs FFN layer-score sums and the top-10 value layers (Table 3 style); where the
top-k value neurons and the query neurons sit (query-only vs query-value); which heads rank top for several
types; how much of a sentence's top neurons the type's other sentences share; and, with the model, what
switching off value neurons, query neurons and heads does against random controls.

What a run stored is read from its run.json, never assumed: k (`top`, value and query neurons kept per
sentence), the model's shape, and the settings the model is loaded with again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..datasets import Fact
from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import Sentence, encode_prompt
from ..results.attribution import wins_by_suppressing
from ..results.evaluation import Evaluation
from ..results.tables import TABLES, read_table
from ..settings import ModelSpec, Settings
from .evaluate import evaluate_sentences
from .run_store import read_run, run_lock

TOP_LAYERS = 10
TOP_HEADS = 10
EXAMPLES_PER_TYPE = 5
EXAMPLE_NEURONS = 5
SUPPRESSION_TOP = 10  # a sentence's top value neurons of each kind whose score parts are summarised
GEOGRAPHIC = ("language", "capital", "country")

Progress = Callable[[str, int, int], None]


@dataclass
class LayerSummary:
    """Table 3 style: mean per-sentence layer scores of one type."""

    attention: list[float]  # mean score of each attention layer
    ffn: list[float]
    attention_sum: float  # mean over sentences of the sum over layers
    ffn_sum: float
    top_layers: list[tuple[str, int, float]]  # ("attention" | "ffn", layer, mean score), best first


@dataclass
class Analysis:
    directory: str
    model: str
    dataset: str
    n_layers: int
    n_heads: int
    top: int  # value neurons of each kind and query neurons the run kept per sentence (k)
    counts: dict[str, int]  # sentences per type
    layers: dict[str, LayerSummary]
    value_histograms: dict[str, dict[str, list[float]]]  # type -> {"attention", "ffn"} -> mean count per layer
    query_histograms: dict[str, dict[str, list[float]]]  # type -> {"query_only", "query_value"} -> per layer
    top_heads: dict[str, list[tuple[int, int, float]]]  # type -> (layer, head, mean score), best first
    head_overlap: dict[str, dict[str, int]]  # shared top heads between two types
    geographic_heads: list[tuple[int, int]]  # in the top heads of language, capital and country alike
    sharing: dict[str, dict[str, float]]  # type -> kind -> mean share of a sentence's top neurons that are common
    examples: dict[str, list[dict]]  # type -> a few sentences with their top neurons
    interventions: dict[str, dict[str, dict]] | None = None  # type -> protocol row -> metrics
    head_interventions: dict[str, dict[str, dict]] | None = None  # heads off (type) -> measured type -> metrics
    intervention_sentences: dict[str, int] = field(default_factory=dict)
    query_via: str = "attention"  # the value neurons the run scored query neurons through
    # type -> "ffn" | "attention" -> {"suppressing": share of each sentence's top-10 value neurons that win by
    # suppressing (a positive score though they raise the answer less than most tokens), "median_push_rank": the
    # answer's median rank among the tokens they raise}; empty for runs stored before value neurons had score
    # parts (docs/method.md §2)
    suppression: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)

    @property
    def types(self) -> list[str]:
        return list(self.counts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunContract:
    """What analysis needs to know of a run, read from its run.json."""

    model: str
    dataset: str
    top: int
    n_layers: int
    n_heads: int
    settings: Settings
    vocab_size: int | None = None  # runs stored before it was recorded: None

    @classmethod
    def of(cls, record: dict) -> RunContract:
        identity = record["identity"]
        shape = record["shape"]
        return cls(identity["model"], identity["dataset"], int(record["top"]), int(shape["n_layers"]),
                   int(shape["n_heads"]), Settings.from_dict(record["settings"]), shape.get("vocab_size"))


def analyze_run(directory: Path | str, *, interventions: bool = True, per_type: int = 20,
                progress: Progress | None = None,
                load: Callable[[ModelSpec], LoadedModel] | None = None) -> Analysis:
    """Every analysis of one run. `load(spec)` loads the run's model (for the interventions); the spec is the
    run's own, as recorded in its run.json. Holds the run's lock (a `run --overwrite` of the same directory
    would remove the tables being read)."""
    with run_lock(Path(directory)):
        return _analyze_run(directory, interventions, per_type, progress, load)


def _analyze_run(directory: Path | str, interventions: bool, per_type: int, progress: Progress | None,
                 load: Callable[[ModelSpec], LoadedModel] | None) -> Analysis:
    report = progress or (lambda what, done, total: None)
    contract = read_contract(directory)
    tables = {name: read_table(directory, name).to_pydict() for name in TABLES}
    sentences = tables["sentences"]
    types_of = dict(zip(sentences["sentence_id"], sentences["type"]))
    order = list(dict.fromkeys(sentences["type"]))
    counts = {kind: sum(1 for t in sentences["type"] if t == kind) for kind in order}
    n_layers, n_heads, top = contract.n_layers, contract.n_heads, contract.top
    report("analysing the tables", 0, 1)
    top_heads = _top_heads(tables["heads"], order, n_layers, n_heads)
    analysis = Analysis(
        directory=str(directory), model=contract.model, dataset=contract.dataset,
        n_layers=n_layers, n_heads=n_heads, top=top, counts=counts, query_via=contract.settings.scoring.query_via,
        layers=_layer_summaries(tables["layers"], order, n_layers),
        value_histograms=_value_histograms(tables["ffn_neurons"], tables["attention_neurons"], types_of, order,
                                           n_layers, top),
        query_histograms=_query_histograms(tables["query_neurons"], tables["ffn_neurons"], types_of, order,
                                           n_layers, top),
        top_heads=top_heads,
        head_overlap={a: {b: len(_head_set(top_heads[a]) & _head_set(top_heads[b])) for b in order} for a in order},
        geographic_heads=_shared_heads(top_heads, GEOGRAPHIC),
        sharing=_sharing(tables, types_of, order, top),
        examples=_examples(tables, order),
        suppression=_suppression(tables, types_of, order, contract.vocab_size),
    )
    report("analysing the tables", 1, 1)
    if interventions:
        if load is None:
            raise ValueError("interventions need a way to load the model")
        _intervene(analysis, load(contract.settings.model), contract.settings, sentences, per_type, report)
    return analysis


def read_contract(directory: Path | str) -> RunContract:
    record = read_run(directory)
    try:
        return RunContract.of(record)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{directory}/run.json lacks the run's settings or model shape (made by an older "
                        "version?); run it again into a new directory") from None


# --- from the tables --------------------------------------------------------------------------------------

def _rows(table: dict[str, list], *columns: str):
    return zip(*(table[c] for c in columns))


def _layer_summaries(layers: dict, order: list[str], n_layers: int) -> dict[str, LayerSummary]:
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((2, n_layers)))
    sentences: dict[str, set] = defaultdict(set)
    for sentence, kind, layer, attention, ffn in _rows(layers, "sentence_id", "type", "layer", "attention", "ffn"):
        sums[kind][:, layer] += (attention, ffn)
        sentences[kind].add(sentence)
    result = {}
    for kind in order:
        mean = sums[kind] / max(1, len(sentences[kind]))
        ranked = sorted([("attention", l, float(mean[0, l])) for l in range(n_layers)]
                        + [("ffn", l, float(mean[1, l])) for l in range(n_layers)], key=lambda r: (-r[2], r[0], r[1]))
        result[kind] = LayerSummary(mean[0].tolist(), mean[1].tolist(), float(mean[0].sum()), float(mean[1].sum()),
                                    ranked[:TOP_LAYERS])
    return result


def _ffn_identity(table: dict) -> tuple[str, ...]:
    """The columns that name an FFN neuron: its expert too, in a run of a mixture-of-experts model."""
    return ("layer", "neuron", "expert") if "expert" in table else ("layer", "neuron")


def _by_sentence(table: dict, *columns: str) -> dict[int, list[tuple]]:
    grouped: dict[int, list[tuple]] = defaultdict(list)
    for sentence, *values in _rows(table, "sentence_id", *columns):
        grouped[sentence].append(tuple(values))
    return grouped


def _value_histograms(ffn: dict, attention: dict, types_of: dict, order: list[str], n_layers: int, top: int):
    """Per type, where each sentence's top-k value neurons sit, FFN and attention ranked together."""
    ffn_rows = _by_sentence(ffn, "score", "layer")
    attention_rows = _by_sentence(attention, "score", "layer")
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((2, n_layers)))
    for sentence, kind in types_of.items():
        ranked = sorted([(s, 1, l) for s, l in ffn_rows[sentence]] + [(s, 0, l) for s, l in attention_rows[sentence]],
                        key=lambda r: -r[0])[:top]
        for _, which, layer in ranked:
            totals[kind][which, layer] += 1
    counts = Counter(types_of.values())
    return {kind: {"attention": (totals[kind][0] / counts[kind]).tolist(),
                   "ffn": (totals[kind][1] / counts[kind]).tolist()} for kind in order}


def _query_histograms(queries: dict, ffn: dict, types_of: dict, order: list[str], n_layers: int, top: int):
    """Per type, the top-k query neurons by layer, split by whether they are also top-k FFN value neurons."""
    query_rows = _by_sentence(queries, "rank", *_ffn_identity(queries))
    value_rows = _by_sentence(ffn, "rank", *_ffn_identity(ffn))
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((2, n_layers)))
    for sentence, kind in types_of.items():
        values = {tuple(neuron) for rank, *neuron in value_rows[sentence] if rank <= top}
        for rank, *neuron in query_rows[sentence]:
            if rank <= top:
                totals[kind][int(tuple(neuron) in values), neuron[0]] += 1
    counts = Counter(types_of.values())
    return {kind: {"query_only": (totals[kind][0] / counts[kind]).tolist(),
                   "query_value": (totals[kind][1] / counts[kind]).tolist()} for kind in order}


def _top_heads(heads: dict, order: list[str], n_layers: int, n_heads: int):
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((n_layers, n_heads)))
    sentences: dict[str, set] = defaultdict(set)
    for sentence, kind, layer, head, score in _rows(heads, "sentence_id", "type", "layer", "head", "score"):
        sums[kind][layer, head] += score
        sentences[kind].add(sentence)
    result = {}
    for kind in order:
        mean = sums[kind] / max(1, len(sentences[kind]))
        flat = sorted(range(mean.size), key=lambda i: (-mean.flat[i], i))[:TOP_HEADS]
        result[kind] = [(*map(int, np.unravel_index(i, mean.shape)), float(mean.flat[i])) for i in flat]
    return result


def _head_set(heads: list[tuple[int, int, float]]) -> set[tuple[int, int]]:
    return {(l, h) for l, h, _ in heads}


def _shared_heads(top_heads: dict, kinds: tuple[str, ...]) -> list[tuple[int, int]]:
    present = [k for k in kinds if k in top_heads]
    if len(present) < 2:
        return []
    shared = set.intersection(*(_head_set(top_heads[k]) for k in present))
    return sorted(shared)


def _sharing(tables: dict, types_of: dict, order: list[str], top: int) -> dict[str, dict[str, float]]:
    """Per type and kind of neuron: the mean share of a sentence's top neurons that occur in the top neurons
    of more than half of the type's sentences."""
    kinds = {
        "ffn_value": _by_sentence(tables["ffn_neurons"], "rank", *_ffn_identity(tables["ffn_neurons"])),
        "attention_value": _by_sentence(tables["attention_neurons"], "rank", "layer", "head", "dim"),
        "query": _by_sentence(tables["query_neurons"], "rank", *_ffn_identity(tables["query_neurons"])),
    }
    members: dict[str, list[int]] = defaultdict(list)
    for sentence, kind in types_of.items():
        members[kind].append(sentence)
    result: dict[str, dict[str, float]] = {}
    for kind in order:
        result[kind] = {}
        for name, rows in kinds.items():
            # attention value neurons are counted by (layer, head, dim), whatever source position they read
            tops = {s: {r[1:] for r in rows[s] if r[0] <= top} for s in members[kind]}
            frequency = Counter(key for top in tops.values() for key in top)
            common = {key for key, n in frequency.items() if n > len(members[kind]) / 2}
            shares = [len(top & common) / len(top) for top in tops.values() if top]
            result[kind][name] = float(np.mean(shares)) if shares else 0.0
    return result


def _suppression(tables: dict, types_of: dict, order: list[str], vocab_size: int | None
                 ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per type and kind of value neuron: how the top neurons raise the answer (see `Analysis.suppression`)."""
    if vocab_size is None or any("target_push_rank" not in tables[name] for name in ("ffn_neurons",
                                                                                   "attention_neurons")):
        return {}
    result: dict[str, dict[str, dict[str, float | None]]] = {kind: {} for kind in order}
    for name, table in (("ffn", tables["ffn_neurons"]), ("attention", tables["attention_neurons"])):
        winners: dict[str, list[bool]] = defaultdict(list)
        ranks: dict[str, list[int]] = defaultdict(list)
        for sentence, rank, score, push_rank in _rows(table, "sentence_id", "rank", "score", "target_push_rank"):
            if rank > SUPPRESSION_TOP or push_rank is None:  # no rank with a contrast
                continue
            kind = types_of[sentence]
            winners[kind].append(wins_by_suppressing(score, push_rank, vocab_size))
            ranks[kind].append(push_rank)
        for kind in order:
            result[kind][name] = {"suppressing": float(np.mean(winners[kind])) if winners[kind] else None,
                                  "median_push_rank": float(np.median(ranks[kind])) if ranks[kind] else None}
    return result


def _examples(tables: dict, order: list[str]) -> dict[str, list[dict]]:
    sentences = tables["sentences"]
    ffn_table = tables["ffn_neurons"]
    missing = [None] * len(ffn_table["sentence_id"])  # runs stored before the score parts
    ffn_table = {**ffn_table, "direct_score": ffn_table.get("direct_score", missing),
                 "target_push_rank": ffn_table.get("target_push_rank", missing),
                 "expert": ffn_table.get("expert", missing)}
    ffn = _by_sentence(ffn_table, "rank", "layer", "neuron", "score", "promoted_tokens", "direct_score",
                       "target_push_rank", "expert")
    attention = _by_sentence(tables["attention_neurons"], "rank", "layer", "head", "dim", "position", "token",
                             "score")
    examples: dict[str, list[dict]] = {kind: [] for kind in order}
    contrasts = sentences.get("contrast_text") or [None] * len(sentences["sentence_id"])  # runs before contrasts
    for (sentence, kind, prompt, target, prob), contrast in zip(
            _rows(sentences, "sentence_id", "type", "prompt", "target_text", "target_prob"), contrasts):
        if len(examples[kind]) >= EXAMPLES_PER_TYPE:
            continue
        examples[kind].append({
            "sentence_id": sentence, "prompt": prompt, "target": target, "prob": prob, "contrast": contrast,
            "ffn_neurons": [{"layer": l, "neuron": n, "score": s, "tokens": promoted[:6], "direct": direct,
                             "push_rank": push_rank, "expert": expert}
                            for _, l, n, s, promoted, direct, push_rank, expert
                            in sorted(ffn[sentence], key=lambda row: row[0])[:EXAMPLE_NEURONS]],
            "attention_neurons": [{"layer": l, "head": h, "dim": d, "position": p, "token": t, "score": s}
                                  for _, l, h, d, p, t, s in sorted(attention[sentence])[:EXAMPLE_NEURONS]],
        })
    return examples


# --- with the model -----------------------------------------------------------------------------------------

def _intervene(analysis: Analysis, model: LoadedModel, settings: Settings, sentences: dict, per_type: int,
               report: Progress) -> None:
    chosen: dict[str, list[Sentence]] = defaultdict(list)
    for kind, prompt, answer, target, source, line in _rows(sentences, "type", "prompt", "answer", "target_id",
                                                            "source", "line"):
        if len(chosen[kind]) < per_type:
            chosen[kind].append(Sentence(Fact(prompt, answer, kind, source, line), encode_prompt(model, prompt),
                                         target))
    analysis.intervention_sentences = {kind: len(s) for kind, s in chosen.items()}
    rows: dict[str, dict[str, dict]] = {}
    for done, (kind, group) in enumerate(chosen.items()):
        report("switching off value and query neurons per type", done, len(chosen))
        value = evaluate_sentences(model, group, protocol="value", settings=settings)
        query = evaluate_sentences(model, group, protocol="query", settings=settings)
        rows[kind] = {"original": asdict(value.methods["original"]),
                      "value": asdict(value.methods["value"]), "random (value)": asdict(value.methods["random"]),
                      "query": asdict(query.methods["query"]), "random (query)": asdict(query.methods["random"])}
    report("switching off value and query neurons per type", len(chosen), len(chosen))
    everything = [s for group in chosen.values() for s in group]
    heads: Evaluation = evaluate_sentences(model, everything, protocol="heads", progress=report, settings=settings)
    analysis.interventions = rows
    analysis.head_interventions = {ablated: {kind: asdict(m) for kind, m in row.items()}
                                   for ablated, row in (heads.by_type or {}).items()}

