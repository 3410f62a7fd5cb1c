"""The Parquet tables of a run: one row per sentence, neuron, layer or head, columns named as in the attribute
JSON (they are the result dataclasses' own fields). Column names are part of the interface: new columns are
added, never renamed."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .attribution import AttentionNeuron, Attribution, FfnNeuron, HeadScore, QueryNeuron
from .plain import plain_fields

TABLES = ("sentences", "ffn_neurons", "attention_neurons", "query_neurons", "layers", "heads")
# gate/up: SwiGLU models only; attention/ffn: None for a query path not taken.
_OPTIONAL_FLOATS = ("gate_score", "up_score", "attention_score", "ffn_score")
# null without a contrast, or for a single-token answer
_OPTIONAL_TYPED = {"contrast_text": pa.string(), "contrast_id": pa.int64(), "token_scores": pa.list_(pa.float64()),
                   "token_coefficients": pa.list_(pa.float64()), "answer_ids": pa.list_(pa.int64()),
                   # a query neuron's position, token and coefficient: null where no reading placed it
                   "position": pa.int64(), "token": pa.string(), "coefficient": pa.float64(),
                   # a value neuron's score parts; null push rank with a contrast
                   "direct_score": pa.float64(), "normaliser_change": pa.float64(), "target_push_rank": pa.int64(),
                   # an FFN neuron's routed expert: null for a dense FFN's and a shared expert's neurons
                   "expert": pa.int64(),
                   # measured beside the score for the top N (run --measure N): null for the others
                   "measured_change": pa.float64(),
                   # reads the first token (attention neurons at source position 0, query neurons acting there)
                   "sink": pa.bool_()}
_TOKEN_LISTS = ("top_tokens", "bottom_tokens", "promoted_tokens", "suppressed_tokens", "tokens")


class SentenceSource(Protocol):
    """What the sentences table needs to know of a sentence besides its attribution."""

    answer: str
    type: str | None
    source: str
    line: int


def tables_of(rows: list[tuple[int, SentenceSource, Attribution]]) -> dict[str, pa.Table]:
    """The six tables of (sentence id, fact, attribution) rows."""
    columns: dict[str, dict[str, list]] = {name: {} for name in TABLES}

    def add(table: str, **values) -> None:
        for key, value in values.items():
            columns[table].setdefault(key, []).append(value)

    for sentence_id, fact, result in rows:
        common = {"sentence_id": sentence_id, "type": fact.type_name}
        add("sentences", **common, prompt=result.prompt, answer=fact.answer, tokens=result.tokens,
            target_text=result.target.text, target_id=result.target.id, target_prob=result.target.prob,
            target_rank=result.target.rank, source=fact.source, line=fact.line,
            contrast_text=None if result.target.contrast is None else result.target.contrast.text,
            contrast_id=None if result.target.contrast is None else result.target.contrast.id,
            answer_ids=None if result.target.tokens is None else [t.id for t in result.target.tokens])
        for table, items in (("ffn_neurons", result.ffn_neurons), ("attention_neurons", result.attention_neurons),
                             ("query_neurons", result.query_neurons)):
            for rank, item in enumerate(items, 1):
                add(table, **common, rank=rank, **plain_fields(item))
        for layer, (attention, ffn) in enumerate(zip(result.layers.attention, result.layers.ffn)):
            add("layers", **common, layer=layer, attention=attention, ffn=ffn)
        for h in result.heads:
            add("heads", **common, **plain_fields(h))
    return {name: pa.table(_typed(values)) if values else _empty(name) for name, values in columns.items()}


# The rows of each neuron table (sentences always has rows: one per sentence).
_ROW_KINDS = {"ffn_neurons": FfnNeuron, "attention_neurons": AttentionNeuron, "query_neurons": QueryNeuron,
              "heads": HeadScore}
_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _empty(table: str) -> pa.Table:
    """A table with no rows still has its columns (`run --query-top 0` stores no query neurons), so that
    parts merge, sort by sentence and read back like any other."""
    schema = [("sentence_id", pa.int64()), ("type", pa.string())]
    if table == "layers":
        schema += [("layer", pa.int64()), ("attention", pa.float64()), ("ffn", pa.float64())]
    else:
        kind = _ROW_KINDS[table]
        hints = typing.get_type_hints(kind)
        schema += [("rank", pa.int64())] if table != "heads" else []
        schema += [(f.name, _arrow_type(hints[f.name])) for f in fields(kind)]
    return pa.table({name: pa.array([], type=kind) for name, kind in schema})


def _arrow_type(hint) -> pa.DataType:
    """int, float, str, bool, list[...] and their optional forms."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _arrow_type(arguments[0])
    if typing.get_origin(hint) is list:
        return pa.list_(_arrow_type(arguments[0]))
    return _ARROW_TYPES[hint]


def _typed(values: dict[str, list]) -> dict[str, pa.Array]:
    """Columns with explicit types, so that parts with and without optional values merge."""
    out = {}
    for key, column in values.items():
        if key in _OPTIONAL_FLOATS:
            out[key] = pa.array(column, type=pa.float64())
        elif key in _OPTIONAL_TYPED:
            out[key] = pa.array(column, type=_OPTIONAL_TYPED[key])
        elif key in _TOKEN_LISTS:
            out[key] = pa.array(column, type=pa.list_(pa.string()))
        else:
            out[key] = pa.array(column)
    return out


def read_table(directory: Path | str, table: str) -> pa.Table:
    path = Path(directory) / f"{table}.parquet"
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"cannot read {path}: {error}; is {directory} a finished run?") from None
