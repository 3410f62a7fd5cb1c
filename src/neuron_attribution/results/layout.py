"""What the terminal report and the notebook display show of an attribution, laid out once: the tables, their
columns and their cells. The two renderers (`reports/terminal.py` with rich, `results/display.py` as HTML) only
draw these; a column added here appears in both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .attribution import Attribution, QueryLayer


@dataclass(frozen=True)
class Tokens:
    """Token texts, drawn as quoted tokens."""

    texts: tuple[str, ...]


@dataclass(frozen=True)
class Bar:
    """A signed bar: value against the table's largest magnitude."""

    value: float
    scale: float


Cell = Union[str, Tokens, Bar]


@dataclass
class Column:
    name: str
    text: bool = False  # left-aligned text (tokens, names) rather than a right-aligned number
    whole: bool = False  # names: never cut nor wrapped (other columns give way)


@dataclass
class TableLayout:
    title: str
    columns: list[Column]
    rows: list[list[Cell]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)  # lines shown under the table


def _signed(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def _rank(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def measure(result: Attribution) -> str:
    return ("log-probability increase" if result.target.contrast is None
            else "increase of log p(target) − log p(contrast)")


SINK_NOTE = ("⚓ acts at the first token, the attention sink, where massive activations sit: a large coefficient there "
             "says little about the prompt (hidden from graphs unless asked for)")


def layer_table(result: Attribution) -> TableLayout:
    attention, ffn = result.layers.attention, result.layers.ffn
    scale = max(max(map(abs, attention), default=0.0), max(map(abs, ffn), default=0.0), 1e-9)
    rows: list[list[Cell]] = [[str(layer), f"{a:+.3f}", Bar(a, scale), f"{f:+.3f}", Bar(f, scale)]
                              for layer, (a, f) in enumerate(zip(attention, ffn))]
    rows.append(["sum", f"{sum(attention):+.3f}", "", f"{sum(ffn):+.3f}", ""])
    return TableLayout(f"Layer scores ({measure(result)})",
                       [Column("layer"), Column("attention"), Column("", True), Column("FFN"), Column("", True)],
                       rows)


def head_table(result: Attribution, rows: int) -> TableLayout:
    with_positions = len({(p.layer, p.head) for p in result.head_positions})
    measured = _measured(result.heads[:rows])
    with_parts = any(h.direct_score is not None for h in result.heads[:rows])  # not in results written before
    contrast = result.target.contrast is not None
    body: list[list[Cell]] = []
    for h in result.heads[:rows]:
        sources = result.strongest_sources(h)
        shown = (", ".join(f"{p.position}:{p.token!r} {p.score:+.3f}" for p in sources) if sources
                 else f"(positions are scored for the top {with_positions} heads)")
        parts = [_signed(h.direct_score), *([] if contrast else [_signed(h.normaliser_change and -h.normaliser_change)])]
        body.append([f"{h.layer}.{h.head}", f"{h.score:+.4f}", *_measured_cell(h, measured),
                     *(parts if with_parts else []), shown])
    part_columns = [Column("direct"), *([] if contrast else [Column("−ΔLSE")])] if with_parts else []
    return TableLayout("Top heads", [Column("head", True, whole=True), Column("score"), *measured, *part_columns,
                                     Column("strongest source positions", True)], body)


def _parts_caption(result: Attribution) -> str:
    if result.target.contrast is not None:
        return ("direct: the push on the answer's logit less the contrast's; the −ΔLSE part is left out: the "
                "log-normaliser cancels in log p(target) − log p(contrast), so it is zero and score = direct")
    of = "" if result.vocab_size is None else f" of {result.vocab_size:,}"
    return ("score = direct + (−ΔLSE): direct is the push on the answer's own logit, −ΔLSE the change of the "
            f"log-normaliser, negated; rank: the answer's rank{of} among the tokens the neuron's contribution raises "
            "(1 = the most); ↓: wins by suppressing (raises the answer less than most tokens, so its score comes "
            "from pushing the probable competitors down)")


def _has_parts(neurons) -> bool:
    return any(n.direct_score is not None for n in neurons)


def _parts(n, with_rank: bool, vocab_size: int | None, with_lse: bool) -> list[Cell]:
    cells: list[Cell] = [_signed(n.direct_score)]
    if with_lse:
        cells.append(_signed(None if n.normaliser_change is None else -n.normaliser_change))
    marker = " ↓" if n.wins_by_suppressing(vocab_size) else ""
    return cells + ([_rank(n.target_push_rank) + marker] if with_rank else [])


def _part_columns(neurons, contrast: bool) -> tuple[list[Column], bool]:
    """The score-part columns where the results have them (not in results written before they existed); the
    rank where it was computed (not with a contrast); no −ΔLSE with a contrast (it cancels: always zero)."""
    if not _has_parts(neurons):
        return [], False
    with_rank = any(n.target_push_rank is not None for n in neurons)
    return ([Column("direct")] + ([] if contrast else [Column("−ΔLSE")])
            + ([Column("rank")] if with_rank else [])), with_rank


def _measured(items) -> list[Column]:
    """The measured change's column where some of the rows were measured (measure=N)."""
    return [Column("off alone")] if any(getattr(item, "measured_change", None) is not None for item in items) else []


def _measured_cell(item, shown: list[Column]) -> list[Cell]:
    return [_signed(item.measured_change)] if shown else []


def _measured_caption(result: Attribution) -> str:
    if not result.measured_top:
        return ""
    together = "" if result.measured_together is None else \
        f"; all {2 * result.measured_top} measured value neurons off together: {result.measured_together:+.4f}"
    return (f"off alone: the measured change of {_outcome(result)} when the neuron is switched off alone (top "
            f"{result.measured_top}; a score is the frozen-norm, first-order effect, not this){together}")


def _coefficient_cell(n) -> str:
    """The coefficient; with every answer token scored, one per answer token's predicting position ("·" where the
    position does not see an attention neuron's source)."""
    if not n.token_coefficients:
        return f"{n.coefficient:+.3f}"
    return " | ".join("·" if c is None else f"{c:+.3f}" for c in n.token_coefficients)


def _outcome(result: Attribution) -> str:
    return "log p(target)" if result.target.contrast is None else "log p(target) − log p(contrast)"


def ffn_table(result: Attribution, rows: int) -> TableLayout:
    neurons = result.ffn_neurons[:rows]
    parts, with_rank = _part_columns(neurons, result.target.contrast is not None)
    measured = _measured(neurons)
    body = [[str(n.index), f"{n.score:+.4f}", *_measured_cell(n, measured),
             *(_parts(n, with_rank, result.vocab_size, result.target.contrast is None) if parts else []),
             _coefficient_cell(n), Tokens(tuple(n.promoted_tokens[:6])), Tokens(tuple(n.suppressed_tokens[:3]))]
            for n in neurons]
    ranked = _ranked(result)
    names = "layer_neuron; an expert's: layer_eEXPERT_neuron" if any(n.expert is not None for n in neurons) \
        else "layer_neuron"
    caption = "\n".join(text for text in (_parts_caption(result) if parts else "", _measured_caption(result)) if text)
    return TableLayout(f"Top FFN value neurons ({names}){ranked}",
                       [Column("neuron", True, whole=True), Column("score"), *measured, *parts, Column("coef"),
                        Column("promotes (coefficient × value vector)", True), Column("suppresses", True)],
                       body, caption)


def _ranked(result: Attribution) -> str:
    if result.rank_by == "direct":
        return " (ranked by the direct part)"
    if result.rank_by == "measured":
        return f" (the top {result.measured_top} ranked by their measured change)"
    return ""


def attention_table(result: Attribution, rows: int) -> TableLayout:
    neurons = result.attention_neurons[:rows]
    parts, with_rank = _part_columns(neurons, result.target.contrast is not None)
    measured = _measured(neurons)
    promotes = any(n.promoted_tokens for n in neurons)
    body = [[f"{n.layer}_{n.head}_{n.dim} @ {n.position}", f"{n.score:+.4f}", *_measured_cell(n, measured),
             *(_parts(n, with_rank, result.vocab_size, result.target.contrast is None) if parts else []),
             _coefficient_cell(n), Tokens((n.token,)) if not n.sink else f"{n.token!r} ⚓",
             *([Tokens(tuple(n.promoted_tokens[:4])), Tokens(tuple(n.suppressed_tokens[:3]))] if promotes else [])]
            for n in neurons]
    ranked = _ranked(result)
    return TableLayout(f"Top attention value neurons (layer_head_dim @ source position){ranked}",
                       [Column("neuron", True, whole=True), Column("score"), *measured, *parts, Column("coef"),
                        Column("source token", True),
                        *([Column("promotes", True), Column("suppresses", True)] if promotes else [])],
                       body, notes=[SINK_NOTE] if any(n.sink for n in neurons) else [])  # parts: under FFN


_PATH_NAMES = {"attention": "attention", "ffn": "FFN", "both": "attention and FFN"}


def query_table(result: Attribution, rows: int) -> TableLayout:
    via = result.query_via
    # The two paths' parts beside the score only where both were taken; gate/up wherever they exist.
    parts = [("gate", lambda q: q.gate_score), ("up", lambda q: q.up_score)]
    if via == "both":
        parts = [("via attention", lambda q: q.attention_score), ("via FFN", lambda q: q.ffn_score), *parts]
    paths = [(name, pick) for name, pick in parts if any(pick(q) is not None for q in result.query_neurons)]
    located = any(q.position is not None for q in result.query_neurons)
    columns = [Column("neuron", True, whole=True), Column("score"), *(Column(name) for name, _ in paths)]
    columns += [Column("acts at", True), Column("coefficient")] if located else []
    body: list[list[Cell]] = []
    for q in result.query_neurons[:rows]:
        where: list[Cell] = [f"{q.position} {q.token!r}" + (" ⚓" if q.sink else ""), f"{q.coefficient:+.3f}"] \
            if q.position is not None else \
            (["", ""] if located else [])
        body.append([str(q.index), f"{q.score:+.4f}", *(_signed(pick(q)) for _, pick in paths), *where])
    notes = [f"Skipped (input·subkey ≈ 0, or gate/up elasticities cancel): {', '.join(result.query_skipped)}"] \
        if result.query_skipped else []
    if any(q.sink for q in result.query_neurons[:rows]):
        notes.append(SINK_NOTE)
    return TableLayout(f"Top query FFN neurons (activate the top {_PATH_NAMES[via]} value neurons)", columns, body,
                       notes=notes)


def query_layer_table(result: Attribution, rows: int) -> TableLayout:
    kinds = [(name, rows_) for name, rows_ in (("for FFN value neurons", result.query_layers.for_ffn),
                                               ("for attention value neurons", result.query_layers.for_attention))
             if rows_]
    columns = [column for name, _ in kinds for column in (Column(name, True), Column("score"))]
    by_score = [sorted(rows_, key=lambda r: -r.score)[:min(rows, 8)] for _, rows_ in kinds]
    body: list[list[Cell]] = [[cell for row in group for cell in (_component(row), f"{row.score:+.3f}")]
                              for group in zip(*by_score)]
    return TableLayout("Top query layers", columns, body)


def _component(row: QueryLayer) -> str:
    return "embedding" if row.layer is None else f"{row.component} {row.layer}"


def attribution_tables(result: Attribution, rows: int) -> list[TableLayout]:
    """Every table of an attribution's report, in order."""
    tables = [layer_table(result), head_table(result, rows), ffn_table(result, rows), attention_table(result, rows)]
    if result.query_neurons or result.query_layers.for_ffn or result.query_layers.for_attention:
        tables += [query_table(result, rows), query_layer_table(result, rows)]
    return tables
