"""An attribution as compact HTML for notebooks (`Attribution._repr_html_`): the tables of the terminal report —
the prediction, layer scores with bars, the top heads with their source tokens, the top FFN, attention and query
neurons with what they promote. Every text from the model or the prompt is escaped; no script, no external file."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .layout import Bar, Cell, TableLayout, Tokens, attribution_tables

if TYPE_CHECKING:
    from .attribution import Attribution

ROWS = 10
_STYLE = ("<style>.na-attr{font:12px/1.35 system-ui,sans-serif;max-width:980px}"
          ".na-attr table{border-collapse:collapse;margin:4px 12px 10px 0;display:inline-table;vertical-align:top}"
          ".na-attr th,.na-attr td{padding:1px 6px;text-align:right;border-bottom:1px solid #ddd}"
          ".na-attr th{background:#f3f3f3}.na-attr td.t{text-align:left;font-family:monospace}"
          ".na-attr caption{font-weight:600;text-align:left;padding:2px 0}"
          ".na-attr .bar{display:inline-block;height:9px;vertical-align:middle}"
          ".na-attr .pos{background:#3a8f3a}.na-attr .neg{background:#c0392b}</style>")


def attribution_html(result: Attribution, rows: int = ROWS) -> str:
    parts = ['<div class="na-attr">', _STYLE, _header(result)]
    parts += [_layout_html(layout) for layout in attribution_tables(result, rows)]
    parts.append("</div>")
    return "".join(parts)


def _text(value: object) -> str:
    return escape(str(value), quote=True)


def _token(token: str) -> str:
    return f"<code>{_text(repr(token))}</code>"


def _table(caption: str, header: list[str], body: list[list[str]], text_columns: set[int] = frozenset()) -> str:
    """Cells in `body` are HTML already (escaped by the caller); caption and header are escaped here."""
    head = "".join(f'<th style="text-align:left">{_text(h)}</th>' if i in text_columns else f"<th>{_text(h)}</th>"
                   for i, h in enumerate(header))
    lines = "".join("<tr>" + "".join(f'<td class="t">{c}</td>' if i in text_columns else f"<td>{c}</td>"
                                     for i, c in enumerate(row)) + "</tr>" for row in body)
    return f"<table><caption>{_text(caption)}</caption><tr>{head}</tr>{lines}</table>"


def _header(result: Attribution) -> str:
    target = result.target
    line = (f"<p><b>{_text(repr(result.prompt))}</b> → {_token(target.shown)}: probability {target.prob:.2%}, "
            f"rank {target.rank}; top prediction {_token(result.predictions[0].token)} "
            f"({result.predictions[0].prob:.2%})")
    if target.contrast is not None:
        line += (f"; contrast {_token(target.contrast.text)} ({target.contrast.prob:.2%}, rank "
                 f"{target.contrast.rank}): scores are for log p(target) − log p(contrast)")
    return line + f". Model {_text(result.model)}.</p>"


def _bar(value: float, scale: float) -> str:
    width = int(round(60 * abs(value) / scale))
    return f'<span class="bar {"pos" if value >= 0 else "neg"}" style="width:{width}px"></span>'


def _cell(cell: Cell) -> str:
    if isinstance(cell, Bar):
        return _bar(cell.value, cell.scale)
    if isinstance(cell, Tokens):
        return " ".join(_token(t) for t in cell.texts)
    return _text(cell)


def _layout_html(layout: TableLayout) -> str:
    text_columns = {i for i, column in enumerate(layout.columns) if column.text}
    table = _table(layout.title, [c.name for c in layout.columns], [[_cell(c) for c in row] for row in layout.rows],
                   text_columns)
    notes = "".join(f"<p><small>{_text(note)}</small></p>" for note in layout.notes)
    caption = f"<p><small>{_text(layout.caption)}</small></p>" if layout.caption else ""
    return table + caption + notes
