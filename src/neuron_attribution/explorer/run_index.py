"""Finished runs indexed once, at start, in an in-memory DuckDB database: every run's six Parquet tables read
into one table each (a `run` column says whose rows they are), sorted by neuron so that a neuron's rows are
found by the engine's zone maps. Every page is one or a few SQL queries; no Python loop walks rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..neurons import AttentionIndex, FfnIndex, HeadIndex, NeuronIndex
from ..pipelines.run_store import read_run
from ..results.attribution import wins_by_suppressing
from ..results.tables import TABLES

TOP_HEADS = 10  # a head "is in a sentence's top" when it ranks among its 10 best heads
RUN_TOP = 10  # the run view's neurons and heads per type
SENTENCES_SHOWN = 500  # a neuron page's sentences (the best scores first)
HISTOGRAM_BINS = 20
# What must agree between a run and the model the explorer loaded, for the run's neuron numbers to name the
# same neurons.
SHAPE_KEYS = ("family", "n_layers", "n_heads", "head_dim", "d_model", "d_ffn", "vocab_size")
# Columns added to the tables over time: a run written before they existed reads them as null.
_LATER_COLUMNS = {"ffn_neurons": {"promoted_tokens": "VARCHAR[]", "direct_score": "DOUBLE",
                                  "target_push_rank": "BIGINT", "expert": "BIGINT"},
                  "query_neurons": {"expert": "BIGINT"},
                  "attention_neurons": {"promoted_tokens": "VARCHAR[]", "direct_score": "DOUBLE",
                                        "target_push_rank": "BIGINT"}}
# An FFN neuron's text form (neurons.FfnIndex): layer_neuron, or layer_eEXPERT_neuron in a mixture of experts.
_FFN_NAME = "layer || '_' || coalesce('e' || expert || '_', '') || neuron"
_SORT = {"ffn_neurons": "layer, neuron", "attention_neurons": "layer, head, dim", "query_neurons": "layer, neuron",
         "heads": "layer, head", "layers": "run, type, layer", "sentences": "run, sentence_id"}


@dataclass(frozen=True)
class RunInfo:
    index: int
    path: Path
    record: dict

    def summary(self) -> dict[str, Any]:
        r, identity = self.record, self.record.get("identity", {})
        return {"run": self.index, "name": self.path.name, "path": str(self.path), "model": identity.get("model"),
                "dataset": identity.get("dataset"), "sentences": r.get("sentences"), "top": r.get("top"),
                "created": r.get("created"), "used": r.get("used", {})}


def check_runs(directories: list[Path]) -> list[RunInfo]:
    """Each directory a finished run with all its tables, or a one-line UserError naming what is wrong."""
    runs = []
    for i, directory in enumerate(directories):
        if not directory.is_dir():
            raise UserError(f"--run {directory}: no such directory")
        record = read_run(directory)
        missing = [t for t in TABLES if not (directory / f"{t}.parquet").is_file()]
        if missing:
            raise UserError(f"--run {directory}: {missing[0]}.parquet is missing; is the run finished?")
        runs.append(RunInfo(i, directory.resolve(), record))
    return runs


def check_shape(runs: list[RunInfo], shape: dict[str, Any]) -> None:
    for run in runs:
        theirs = run.record.get("shape", {})
        different = [f"{k} {theirs.get(k)} there, {shape.get(k)} here" for k in SHAPE_KEYS
                     if k in theirs and theirs.get(k) != shape.get(k)]
        if different:
            raise UserError(f"--run {run.path} was made with another model ({'; '.join(different)}); "
                            "serve it with that model (--model)")


class RunIndex:
    """The loaded runs' tables, queryable from any thread (each query on its own cursor)."""

    def __init__(self, runs: list[RunInfo]):
        import duckdb

        self.runs = runs
        self._connection = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        try:
            for table in TABLES:
                self._load(table)
        except duckdb.Error as error:
            raise UserError(f"could not read the runs' tables: {str(error).splitlines()[0]}") from None
        self.top = {run.index: int(run.record.get("top") or 0) for run in runs}

    def _load(self, table: str) -> None:
        if not self.runs:
            return
        files = [str(run.path / f"{table}.parquet") for run in self.runs]
        runs = " UNION ALL ".join(f"SELECT {run.index} AS run, ? AS filename" for run in self.runs)
        extra = ", rank() OVER (PARTITION BY t.filename, sentence_id ORDER BY score DESC) AS rank" \
            if table == "heads" else ""
        self._connection.execute(
            f"CREATE TABLE {table} AS SELECT f.run, t.* EXCLUDE (filename){extra} "
            f"FROM read_parquet(?, union_by_name = true, filename = true) t JOIN ({runs}) f USING (filename) "
            f"ORDER BY {_SORT[table]}", [files, *files])
        for column, kind in _LATER_COLUMNS.get(table, {}).items():
            self._connection.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    def _query(self, sql: str, parameters: list | None = None) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._connection.cursor()
        try:
            result = cursor.execute(sql, parameters or [])
            names = [c[0] for c in result.description]
            return [dict(zip(names, row)) for row in result.fetchall()]
        finally:
            cursor.close()

    def run_info(self, run: int) -> RunInfo:
        if not 0 <= run < len(self.runs):
            raise LookupError(f"no run {run}; {len(self.runs)} loaded")
        return self.runs[run]

    # -- a neuron across runs ---------------------------------------------------------------------------------

    def neuron_view(self, index: NeuronIndex) -> list[dict[str, Any]]:
        """Per loaded run: the sentences where the neuron is in the run's top-k (best scores first), and per
        knowledge type how many of the type's sentences have it, its score distribution and a histogram.

        Everything counts sentences. An attention neuron has a row per source position in a sentence; it is
        summarised by its best one there (the highest score, with its position and token, and `positions`: how
        many of its positions are in the top-k), so a 6-sentence run never shows it "in 12 of 6 sentences"."""
        if not self.runs:
            return []
        table, where, parameters, extra = _neuron_filter(index)
        hits = f"SELECT run, sentence_id, type, rank, score{extra} FROM {table} WHERE {where}"
        if table == "attention_neurons":
            hits = (f"SELECT run, sentence_id, type, rank, score{extra}, count(*) OVER (PARTITION BY run, sentence_id) "
                    f"AS positions FROM {table} WHERE {where} QUALIFY row_number() OVER (PARTITION BY run, "
                    "sentence_id ORDER BY score DESC, position) = 1")
        sentences = self._query(
            f"WITH hits AS ({hits}) SELECT h.*, s.prompt, s.target_text, s.target_prob FROM hits h "
            f"JOIN sentences s USING (run, sentence_id) ORDER BY h.score DESC LIMIT {SENTENCES_SHOWN}", parameters)
        # what it pushes: the top end of its projection where its coefficient is positive, the bottom end where
        # negative; it wins by suppressing where it raises log p although the target's push rank is in the lower
        # half of the vocabulary (`wins_by_suppressing`)
        pushes = ("" if table == "heads" else
                  ", count(*) FILTER (WHERE h.coefficient >= 0) AS top_end, count(*) FILTER (WHERE h.coefficient < 0) "
                  "AS bottom_end, count(*) FILTER (WHERE h.score > 0 AND h.target_push_rank > t.vocab / 2) "
                  "AS by_suppressing")
        per_type = self._query(
            f"WITH hits AS ({hits}), vocab AS ({self._vocab_sizes()}), totals AS (SELECT run, type, "
            "count(*) AS sentences, any_value(vocab.size) AS vocab FROM sentences JOIN vocab USING (run) "
            "GROUP BY run, type) SELECT t.run, t.type, t.sentences, count(h.score) AS hits, avg(h.score) AS mean, "
            f"median(h.score) AS median, min(h.score) AS min, max(h.score) AS max{pushes} FROM totals t "
            "LEFT JOIN hits h USING (run, type) GROUP BY t.run, t.type, t.sentences ORDER BY t.run, hits DESC, t.type",
            parameters)
        if table != "heads":
            for row in sentences:
                vocab = self.vocab_size(row["run"])
                row["wins_by_suppressing"] = None if row.get("target_push_rank") is None or vocab is None else \
                    wins_by_suppressing(row["score"], row["target_push_rank"], vocab)
        bins = self._query(
            f"WITH hits AS ({hits}), span AS (SELECT min(score) AS lo, greatest(max(score) - min(score), 1e-12) "
            f"AS width FROM hits) SELECT run, type, least(floor((score - lo) / width * {HISTOGRAM_BINS}), "
            f"{HISTOGRAM_BINS - 1})::INTEGER AS bin, count(*) AS count, any_value(lo) AS lo, "
            "any_value(width) AS width FROM hits, span GROUP BY run, type, bin ORDER BY run, type, bin", parameters)
        return [{**run.summary(), "hits": sum(r["hits"] for r in per_type if r["run"] == run.index),
                 "top_k": TOP_HEADS if isinstance(index, HeadIndex) else self.top[run.index],
                 "sentences_with": [r for r in sentences if r["run"] == run.index],
                 "per_type": [r for r in per_type if r["run"] == run.index],
                 "histogram": [r for r in bins if r["run"] == run.index]} for run in self.runs]

    def vocab_size(self, run: int) -> int | None:
        """The run's model's vocabulary size, as its record gives the model's shape."""
        return self.runs[run].record.get("shape", {}).get("vocab_size")

    def _vocab_sizes(self) -> str:
        """SQL rows (run, size): each run's vocabulary size (NULL where its record does not say)."""
        sizes = [f"({run.index}, {int(self.vocab_size(run.index)) if self.vocab_size(run.index) else 'NULL'})"
                 for run in self.runs]
        return "SELECT * FROM (VALUES " + ", ".join(sizes) + ") AS v(run, size)"

    def promoting(self, token: str) -> list[dict[str, Any]]:
        """Value neurons that had `token` among the tokens they promote in the runs' sentences, most often
        first."""
        if not self.runs:
            return []
        return self._query(
            f"SELECT run, 'ffn' AS kind, {_FFN_NAME} AS name, count(*) AS sentences, avg(score) AS mean "
            "FROM ffn_neurons WHERE list_contains(promoted_tokens, ?) GROUP BY run, layer, expert, neuron "
            "UNION ALL SELECT run, 'attention', layer || '_' || head || '_' || dim, count(DISTINCT sentence_id), "
            "avg(score) FROM attention_neurons WHERE list_contains(promoted_tokens, ?) GROUP BY run, layer, head, dim "
            f"ORDER BY sentences DESC, mean DESC LIMIT {3 * RUN_TOP}", [token, token])

    # -- a run ------------------------------------------------------------------------------------------------

    def run_view(self, run: int) -> dict[str, Any]:
        info = self.run_info(run)
        types = self._query("SELECT type, count(*) AS sentences, avg(target_prob) AS mean_prob FROM sentences "
                            "WHERE run = ? GROUP BY type ORDER BY type", [run])
        layers = self._query("SELECT type, layer, avg(attention) AS attention, avg(ffn) AS ffn FROM layers "
                             "WHERE run = ? GROUP BY type, layer ORDER BY type, layer", [run])
        heads = self._query(
            "SELECT type, layer, head, layer || '.' || head AS name, avg(score) AS mean FROM heads WHERE run = ? "
            "GROUP BY type, layer, head QUALIFY row_number() OVER (PARTITION BY type ORDER BY mean DESC) <= "
            f"{RUN_TOP} ORDER BY type, mean DESC", [run])
        neurons = self._query(
            f"SELECT type, {_FFN_NAME} AS name, count(*) AS sentences, avg(score) AS mean, "
            "count(*) FILTER (WHERE coefficient < 0) AS bottom_end "
            f"FROM ffn_neurons WHERE run = ? AND rank <= {RUN_TOP} GROUP BY type, layer, expert, neuron "
            f"QUALIFY row_number() OVER (PARTITION BY type ORDER BY sentences DESC, mean DESC) <= {RUN_TOP} "
            "ORDER BY type, sentences DESC, mean DESC", [run])
        sentences = self._query("SELECT sentence_id, type, prompt, target_text, target_prob, target_rank "
                                "FROM sentences WHERE run = ? ORDER BY sentence_id", [run])
        return {**info.summary(), "types": types, "layers": layers, "heads": heads,
                "shared_heads": _shared(heads), "neurons": neurons, "sentences": sentences}


def _neuron_filter(index: NeuronIndex) -> tuple[str, str, list, str]:
    """(table, WHERE clause, its parameters, extra columns) selecting one neuron's rows."""
    if isinstance(index, FfnIndex):
        return ("ffn_neurons", "layer = ? AND neuron = ? AND expert IS NOT DISTINCT FROM ?",
                [index.layer, index.neuron, index.expert], ", coefficient, target_push_rank")
    if isinstance(index, AttentionIndex):
        at = "" if index.position is None else " AND position = ?"
        return ("attention_neurons", f"layer = ? AND head = ? AND dim = ?{at}",
                [index.layer, index.head, index.dim, *([] if index.position is None else [index.position])],
                ", coefficient, target_push_rank, position, token")
    return "heads", f"layer = ? AND head = ? AND rank <= {TOP_HEADS}", [index.layer, index.head], ""


def _shared(heads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Heads among the top of two or more types, with those types (a few dozen rows: plain Python)."""
    types_of: dict[str, list[str]] = {}
    for row in heads:
        types_of.setdefault(row["name"], []).append(row["type"])
    return sorted(({"name": name, "types": types} for name, types in types_of.items() if len(types) > 1),
                  key=lambda r: (-len(r["types"]), r["name"]))
