"""Plots (PNG, one figure per question), analysis.json and one self-contained report.html for an Analysis.

Everything from the model or the data that reaches the page (tokens, prompts, answers, type names) goes through
html.escape: vocabulary tokens contain markup.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import unicodedata
from pathlib import Path

import numpy as np
# Figures drawn straight onto an Agg canvas: no pyplot, so no process-wide backend is chosen and no window or
# figure registry is involved (a notebook importing this module keeps its own backend).
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

from ..errors import UserError
from ..neurons import FfnIndex
from ..files import write_bytes_atomic, write_json
from ..pipelines.analyze import GEOGRAPHIC, SUPPRESSION_TOP, TOP_HEADS, TOP_LAYERS, Analysis
from ..pipelines.protocols import HEAD_FRACTION, QueryNeurons, ValueNeurons


def write_report(analysis: Analysis, directory: Path | str) -> Path:
    """Writes the PNGs, analysis.json and report.html into `directory`; returns the report's path."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to {directory}: {error.strerror or error}") from None
    figures = {name: draw(analysis) for name, draw in FIGURES.items()}
    figures = {name: png for name, png in figures.items() if png is not None}
    for name, png in figures.items():
        write_bytes_atomic(directory / f"{name}.png", png)
    write_json(directory / "analysis.json", analysis.to_dict())
    page = render_html(analysis, figures)
    write_bytes_atomic(directory / "report.html", page.encode("utf-8"))
    return directory / "report.html"


# --- figures --------------------------------------------------------------------------------------------------

def _new_figure(**options) -> Figure:
    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


@functools.cache
def _font_characters() -> frozenset[int]:
    """Code points the figures' font can draw."""
    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    return frozenset(font.get_charmap())


def _drawable(text: str) -> str:
    """`text` without the characters the figures' font has no glyph for (emoji in a type name would be empty
    boxes and a warning); the page's tables keep the full text."""
    kept = "".join(c for c in text if c.isspace() or (ord(c) in _font_characters()
                                                        and unicodedata.category(c) not in ("Cf", "Mn")))
    return " ".join(kept.split()) or "?"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _grid(n: int):
    columns = min(3, n)
    rows = -(-n // columns)
    # Constrained layout keeps titles, labels and the figure legend from overlapping one another.
    figure = _new_figure(figsize=(5 * columns, 3.2 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    for extra in axes.flat[n:]:
        extra.set_visible(False)
    return figure, list(axes.flat)


def _legend_below(figure, axis) -> None:
    """One legend for the figure, below the plots, where it can cover neither data nor titles."""
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)


def layer_scores_figure(analysis: Analysis) -> bytes:
    figure, axes = _grid(len(analysis.types))
    layers = np.arange(analysis.n_layers)
    for axis, kind in zip(axes, analysis.types):
        summary = analysis.layers[kind]
        axis.plot(layers, summary.attention, marker=".", label="attention layer")
        axis.plot(layers, summary.ffn, marker=".", label="FFN layer")
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.set_title(f"{_drawable(kind)} ({analysis.counts[kind]} sentences)")
        axis.set_xlabel("layer")
        axis.set_ylabel("mean log-prob increase")
    figure.suptitle("Layer scores: how much each layer raises log p(answer)")
    _legend_below(figure, axes[0])
    return _png(figure)


def _stacked_by_layer(analysis: Analysis, histograms: dict[str, dict[str, list[float]]],
                      series: tuple[tuple[str, str], tuple[str, str]], title: str) -> bytes:
    """Per type, two counts per layer stacked: (key, legend label) for the lower and the upper bars."""
    figure, axes = _grid(len(analysis.types))
    layers = np.arange(analysis.n_layers)
    (lower, lower_label), (upper, upper_label) = series
    for axis, kind in zip(axes, analysis.types):
        counts = histograms[kind]
        axis.bar(layers, counts[lower], label=lower_label)
        axis.bar(layers, counts[upper], bottom=counts[lower], label=upper_label)
        axis.set_title(_drawable(kind))
        axis.set_xlabel("layer")
        axis.set_ylabel("neurons per sentence")
    figure.suptitle(title)
    _legend_below(figure, axes[0])
    return _png(figure)


def value_histogram_figure(analysis: Analysis) -> bytes:
    return _stacked_by_layer(analysis, analysis.value_histograms,
                             (("attention", "attention value neurons"), ("ffn", "FFN value neurons")),
                             f"Where the top-{analysis.top} value neurons sit")


def query_histogram_figure(analysis: Analysis) -> bytes:
    return _stacked_by_layer(analysis, analysis.query_histograms,
                             (("query_only", "query-only"), ("query_value", "query and value")),
                             f"Where the top-{analysis.top} query FFN neurons sit (via {analysis.query_via} value "
                             "neurons)")


def head_overlap_figure(analysis: Analysis) -> bytes:
    kinds = analysis.types
    matrix = np.array([[analysis.head_overlap[a][b] for b in kinds] for a in kinds])
    figure = _new_figure(figsize=(0.7 * len(kinds) + 2.5, 0.6 * len(kinds) + 1.5), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="Blues", vmin=0)
    axis.set_xticks(range(len(kinds)), [_drawable(k) for k in kinds], rotation=45, ha="right")
    axis.set_yticks(range(len(kinds)), [_drawable(k) for k in kinds])
    for i in range(len(kinds)):
        for j in range(len(kinds)):
            axis.text(j, i, str(matrix[i, j]), ha="center", va="center",
                      color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    figure.colorbar(image, ax=axis, label="shared heads")
    axis.set_title(f"Top-{TOP_HEADS} heads shared between knowledge types")
    return _png(figure)


def sharing_figure(analysis: Analysis) -> bytes:
    kinds = analysis.types
    names = [("ffn_value", "FFN value"), ("attention_value", "attention value"), ("query", "query")]
    x = np.arange(len(kinds))
    figure = _new_figure(figsize=(1.4 * len(kinds) + 3, 3.9), layout="constrained")
    axis = figure.subplots()
    for i, (key, label) in enumerate(names):
        axis.bar(x + (i - 1) * 0.27, [analysis.sharing[k][key] for k in kinds], width=0.27, label=label)
    axis.set_xticks(x, [_drawable(k) for k in kinds])
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of a sentence's top neurons")
    figure.suptitle("Neurons common to more than half of a type's sentences")
    _legend_below(figure, axis)
    return _png(figure)


def interventions_figure(analysis: Analysis) -> bytes | None:
    if not analysis.interventions:
        return None
    kinds = list(analysis.interventions)
    rows = ["value", "random (value)", "query", "random (query)"]
    x = np.arange(len(kinds))
    figure = _new_figure(figsize=(1.4 * len(kinds) + 3, 3.9), layout="constrained")
    axis = figure.subplots()
    for i, row in enumerate(rows):
        axis.bar(x + (i - 1.5) * 0.2, [analysis.interventions[k][row]["mrr_decrease"] for k in kinds], width=0.2,
                 label=row)
    axis.set_xticks(x, [_drawable(k) for k in kinds])
    axis.set_ylabel("relative MRR decrease")
    figure.suptitle("Switching off value and query neurons vs random ones")
    _legend_below(figure, axis)
    return _png(figure)


FIGURES = {"layer_scores": layer_scores_figure, "value_neurons_by_layer": value_histogram_figure,
           "query_neurons_by_layer": query_histogram_figure, "head_overlap": head_overlap_figure,
           "sharing": sharing_figure, "interventions": interventions_figure}


# --- the page -------------------------------------------------------------------------------------------------

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list], caption: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    title = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def render_html(analysis: Analysis, figures: dict[str, bytes]) -> str:
    a = analysis
    sections = [f"<h1>Neuron attribution: {_e(a.model)} on {_e(a.dataset)}</h1>",
                f"<p>{sum(a.counts.values())} sentences the model knows: "
                + ", ".join(f"{_e(k)} {n}" for k, n in a.counts.items()) + ".</p>"]

    sections.append("<h2>Attention and FFN layers (Table 3 style)</h2>")
    sections.append(_table(
        ["type", "sentences", "attention layers, sum", "FFN layers, sum", f"top-{TOP_LAYERS} value layers"],
        [[k, a.counts[k], f"{a.layers[k].attention_sum:.3f}", f"{a.layers[k].ffn_sum:.3f}",
          ", ".join(f"{'A' if c == 'attention' else 'F'}{l}" for c, l, _ in a.layers[k].top_layers)]
         for k in a.types],
        "mean over sentences of the summed log-probability increases; A = attention layer, F = FFN layer"))
    sections.append(_figure(figures, "layer_scores", "layer scores per type"))

    sections.append("<h2>Where the value and query neurons sit</h2>")
    sections.append(_table(
        ["type", "attention value neurons", "FFN value neurons", "mean layer (value)", "query-only",
         "query-value", "mean layer (query)"],
        [[k, f"{sum(a.value_histograms[k]['attention']):.1f}", f"{sum(a.value_histograms[k]['ffn']):.1f}",
          f"{_mean_layer(a.value_histograms[k]['attention'], a.value_histograms[k]['ffn']):.1f}",
          f"{sum(a.query_histograms[k]['query_only']):.1f}", f"{sum(a.query_histograms[k]['query_value']):.1f}",
          f"{_mean_layer(a.query_histograms[k]['query_only'], a.query_histograms[k]['query_value']):.1f}"]
         for k in a.types],
        f"per sentence, of its top-{a.top} value neurons (both kinds ranked together) and top-{a.top} query "
        "neurons; "
        f"the model has {a.n_layers} layers"))
    sections.append(_figure(figures, "value_neurons_by_layer", "value neurons by layer"))
    sections.append(_figure(figures, "query_neurons_by_layer", "query neurons by layer"))

    sections.append("<h2>Heads</h2>")
    sections.append(_table(["type", f"top-{TOP_HEADS} heads (layer.head: mean score)"],
                           [[k, ", ".join(f"{l}.{h}: {s:.3f}" for l, h, s in a.top_heads[k])] for k in a.types]))
    sections.append(_shared_heads_html(a))
    sections.append(_figure(figures, "head_overlap", "head overlap between types"))

    sections.append("<h2>Sharing</h2>")
    sections.append(_table(
        ["type", "FFN value", "attention value", "query"],
        [[k, f"{a.sharing[k]['ffn_value']:.1%}", f"{a.sharing[k]['attention_value']:.1%}",
          f"{a.sharing[k]['query']:.1%}"] for k in a.types],
        f"mean share of a sentence's top-{a.top} neurons that occur in the top-{a.top} of more than half of the "
        "type's "
        "sentences (attention neurons counted by layer, head and dimension)"))
    sections.append(_figure(figures, "sharing", "sharing"))

    sections.append(_suppression_html(a))
    sections.append(_interventions_html(a, figures))
    sections.append(_examples_html(a))
    return _PAGE.format(title=_e(f"neuron-attribution report: {a.model}"), body="\n".join(s for s in sections if s))


def _suppression_html(a: Analysis) -> str:
    """How the top value neurons raise the answer: by their push on its logit, or by pushing the others down."""
    if not a.suppression:
        return ""

    def cells(part: dict) -> list[str]:
        share, rank = part.get("suppressing"), part.get("median_push_rank")
        return ["" if share is None else f"{share:.1%}", "" if rank is None else f"{rank:,.0f}"]

    rows = [[k, *cells(a.suppression[k]["ffn"]), *cells(a.suppression[k]["attention"])] for k in a.types]
    return "<h2>Pushing the answer up, or the others down</h2>" + _table(
        ["type", "FFN: win by suppressing", "FFN: median rank of the answer", "attention: win by suppressing",
         "attention: median rank of the answer"], rows,
        f"over each sentence's top {SUPPRESSION_TOP} value neurons of each kind. Rank: where the answer stands among "
        "the tokens a neuron's contribution raises (1 = the most). A neuron wins by suppressing when it raises the "
        "answer's log-probability although it raises the answer less than it raises most tokens (a rank in the "
        "lower half of the vocabulary): the gain comes from pushing the probable competitors down")


def _shared_heads_html(a: Analysis) -> str:
    """The heads the geographic types share, said only of the geographic types the run has (two or more)."""
    present = [kind for kind in GEOGRAPHIC if kind in a.counts]
    if len(present) < 2:
        return ""
    geographic = ", ".join(f"{l}.{h}" for l, h in a.geographic_heads) or "none"
    return f"<p>Heads in the top {TOP_HEADS} of {_e(_listed(present))} alike: {_e(geographic)}.</p>"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _mean_layer(*series: list[float]) -> float:
    counts = np.sum([np.asarray(s) for s in series], axis=0)
    return float((counts * np.arange(len(counts))).sum() / counts.sum()) if counts.sum() else float("nan")


def _interventions_html(a: Analysis, figures: dict[str, bytes]) -> str:
    if not a.interventions:
        return "<h2>Interventions</h2><p>Not run (--no-interventions).</p>"
    parts = ["<h2>Interventions</h2>"]
    rows = []
    for kind, protocol_rows in a.interventions.items():
        for name, m in protocol_rows.items():
            decrease = "" if name == "original" else _pct(m["mrr_decrease"])
            prob_decrease = "" if name == "original" else _pct(m["prob_decrease"])
            rows.append([kind, a.intervention_sentences.get(kind, ""), name, f"{m['mrr']:.3f}", f"{m['prob']:.2%}",
                         decrease, prob_decrease])
    parts.append(_table(["type", "sentences", "switched off", "MRR", "prob", "MRR decrease", "prob decrease"], rows,
                        _intervention_caption()))
    parts.append(_figure(figures, "interventions", "interventions"))
    if a.head_interventions:
        measured = sorted({k for row in a.head_interventions.values() for k in row})
        parts.append(_table(["heads off \\ measured on", *measured],
                            [[ablated, *(_pct(row[k]["mrr_decrease"]) if k in row else "" for k in measured)]
                             for ablated, row in a.head_interventions.items()],
                            f"relative MRR decrease when the top {HEAD_FRACTION:.0%} of heads of one type are "
                            "switched off"))
    return "\n".join(parts)


def _intervention_caption() -> str:
    n_attention, n_ffn = ValueNeurons.split(ValueNeurons.default_top)
    return (f"value: top-{n_attention} attention + top-{n_ffn} FFN value neurons; query: "
            f"top-{QueryNeurons.default_top} query FFN neurons; random: as many random neurons")


def _examples_html(a: Analysis) -> str:
    parts = ["<h2>Sentences and their top neurons</h2>"]
    for kind, examples in a.examples.items():
        total = a.counts.get(kind, len(examples))
        shown = f"the first {len(examples)} of {total} sentences" if len(examples) < total else \
            f"all {total} sentences"
        parts.append(f"<h3>{_e(kind)}</h3><p class=note>{shown} of this type, in dataset order</p>")
        for ex in examples:
            rather = "" if ex.get("contrast") is None else f" rather than <b>{_e(repr(ex['contrast']))}</b>"
            parts.append(f"<p class=sentence><q>{_e(ex['prompt'])}</q> → <b>{_e(repr(ex['target']))}</b>{rather} "
                         f"(p = {ex['prob']:.2%})</p>")
            parts.append(_table(["FFN neuron", "score", "direct", "rank of the answer", "promotes"],
                                [[str(FfnIndex(n["layer"], n["neuron"], n.get("expert"))), f"{n['score']:.3f}",
                                  _optional(n.get("direct"), ".3f"), _optional(n.get("push_rank"), ",d"),
                                  " ".join(repr(t) for t in n["tokens"])]
                                 for n in ex["ffn_neurons"]]))
            parts.append(_table(["attention neuron (layer_head_dim@position)", "source token", "score"],
                                [[f"{n['layer']}_{n['head']}_{n['dim']}@{n['position']}", repr(n["token"]),
                                  f"{n['score']:.3f}"] for n in ex["attention_neurons"]]))
    return "\n".join(parts)


def _optional(value, form: str) -> str:
    return "" if value is None else format(value, form)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f0f0f0; }}
caption {{ caption-side: bottom; font-size: 0.85em; color: #555; text-align: left; padding-top: 0.3em; }}
img {{ max-width: 100%; }}
.sentence {{ margin-top: 1.2em; }}
</style></head>
<body>
{body}
</body></html>
"""

