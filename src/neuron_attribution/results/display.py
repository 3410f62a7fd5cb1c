"""An attribution as compact HTML for notebooks (`Attribution._repr_html_`): the tables of the terminal report —
the prediction, layer scores with bars, the top heads with their source tokens, the top FFN, attention and query
neurons with what they promote. Every text from the model or the prompt is escaped; no script, no external file."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

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
    parts = ['<div class="na-attr">', _STYLE, _header(result), _layers(result), _heads(result, rows),
             _ffn(result, rows), _attention(result, rows)]
    if result.query_neurons:
        parts.append(_queries(result, rows))
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
    line = (f"<p><b>{_text(repr(result.prompt))}</b> → {_token(target.text)}: probability {target.prob:.2%}, "
            f"rank {target.rank}; top prediction {_token(result.predictions[0].token)} "
            f"({result.predictions[0].prob:.2%})")
    if target.contrast is not None:
        line += (f"; contrast {_token(target.contrast.text)} ({target.contrast.prob:.2%}, rank "
                 f"{target.contrast.rank}): scores are for log p(target) − log p(contrast)")
    return line + f". Model {_text(result.model)}.</p>"


def _bar(value: float, scale: float) -> str:
    width = int(round(60 * abs(value) / scale))
    return f'<span class="bar {"pos" if value >= 0 else "neg"}" style="width:{width}px"></span>'


def _layers(result: Attribution) -> str:
    attention, ffn = result.layers.attention, result.layers.ffn
    scale = max(max(map(abs, attention), default=0.0), max(map(abs, ffn), default=0.0), 1e-9)
    body = [[str(layer), f"{a:+.3f}", _bar(a, scale), f"{f:+.3f}", _bar(f, scale)]
            for layer, (a, f) in enumerate(zip(attention, ffn))]
    body.append(["sum", f"{sum(attention):+.3f}", "", f"{sum(ffn):+.3f}", ""])
    what = ("log-probability increase" if result.target.contrast is None
            else "increase of log p(target) − log p(contrast)")
    return _table(f"Layer scores ({what})", ["layer", "attention", "", "FFN", ""], body, {2, 4})


def _heads(result: Attribution, rows: int) -> str:
    body = []
    for h in result.heads[:rows]:
        sources = result.strongest_sources(h)
        body.append([f"{h.layer}.{h.head}", f"{h.score:+.4f}",
                     ", ".join(f"{p.position}:{_token(p.token)} {p.score:+.3f}" for p in sources)])
    return _table("Top heads", ["head", "score", "strongest source positions"], body, {2})


def _ffn(result: Attribution, rows: int) -> str:
    body = [[f"{n.layer}_{n.neuron}", f"{n.score:+.4f}", f"{n.coefficient:+.3f}",
             " ".join(_token(t) for t in n.promoted_tokens[:6])] for n in result.ffn_neurons[:rows]]
    return _table("Top FFN value neurons", ["neuron", "score", "coef", "promotes"], body, {3})


def _attention(result: Attribution, rows: int) -> str:
    body = [[f"{n.layer}_{n.head}_{n.dim}@{n.position}", f"{n.score:+.4f}", f"{n.coefficient:+.3f}", _token(n.token)]
            for n in result.attention_neurons[:rows]]
    return _table("Top attention value neurons", ["neuron", "score", "coef", "source token"], body, {3})


def _queries(result: Attribution, rows: int) -> str:
    body = [[f"{q.layer}_{q.neuron}", f"{q.score:+.4f}"] for q in result.query_neurons[:rows]]
    return _table(f"Top query FFN neurons (via {result.query_via} value neurons)", ["neuron", "score"], body)
