"""Terminal reports (rich). Only presentation: everything shown is computed elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..results.layout import Bar, Cell, TableLayout, Tokens, attribution_tables


_INFO_LABELS = [("family", "Family"), ("architecture", "Architecture"), ("layers", "Layers"),
                ("heads", "Attention heads"), ("kv_heads", "KV heads"), ("head_dim", "Head size"),
                ("hidden_size", "Hidden size"), ("ffn_neurons_per_layer", "FFN neurons per layer"),
                ("ffn_kind", "FFN type"), ("norm", "Norm"), ("block", "Block"), ("vocab_size", "Vocabulary"),
                ("max_positions", "Context length"), ("attention_neurons_per_token", "Attention neurons per token"),
                ("long_prompts", "Long prompts traced with"),
                ("dtype", "Weights dtype"), ("quantization", "Quantization"), ("memory", "Size in memory"),
                ("device", "Device"), ("source", "Weights from")]


def print_model_info(console: Console, description: dict[str, Any]) -> None:
    table = Table(title=Text(f"Model: {description['name']}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, label in _INFO_LABELS:
        table.add_row(label, Text(str(description[key])))
    console.print(table)


def print_cache(console: Console, root, entries: list) -> None:
    from ..settings import format_size

    table = Table(title=Text(f"Cache {root}"), title_justify="left",
                  caption=f"{len(entries)} entries, {format_size(sum(e.size for e in entries))}; "
                          "neuron-attribution cache --remove NAME (--stale, --clear) frees them; "
                          "NEURON_ATTRIBUTION_CACHE moves the cache", caption_justify="left")
    for column in ("entry", "holds", "size", "from"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold",
                         no_wrap=column == "size")
    for e in entries:
        table.add_row(Text(e.name), Text(e.kind), format_size(e.size), Text(e.detail))
    console.print(table)


def print_predictions(console: Console, prompt: str, predictions: list) -> None:
    console.print(Text(f"Next token after {prompt!r}", style="bold"))
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("prob", justify="right")
    for rank, p in enumerate(predictions, 1):
        table.add_row(str(rank), Text(repr(p.token)), str(p.id), f"{p.prob:.2%}")
    console.print(table)


def _bar(value: float, scale: float, width: int = 24) -> Text:
    """A signed horizontal bar: green to the right for positive scores, red to the left for negative."""
    cells = 0 if scale <= 0 else min(width, round(abs(value) / scale * width))
    if value >= 0:
        return Text(" " * width + "│" + "█" * cells, style="green")
    return Text(" " * (width - cells) + "█" * cells + "│", style="red")


def print_attribution(console: Console, result, rows: int = 10) -> None:
    target = result.target
    contrast = target.contrast
    rather = "" if contrast is None else f" rather than {contrast.text!r}"
    console.rule(Text(f"{result.prompt!r} → {target.shown!r}{rather}"))
    spans = f" (first of {target.n_answer_tokens} answer tokens)" if target.n_answer_tokens > 1 else ""
    if target.tokens is not None:
        spans = f" (first of {len(target.tokens)} answer tokens, all scored)"
    answer = "" if target.answer is None else f"Answer {target.answer!r}. "
    console.print(Text(f"{answer}Target {target.text!r} id {target.id}{spans}: probability {target.prob:.2%}, "
                       f"rank {target.rank}.  Top prediction: {result.predictions[0].token!r} "
                       f"({result.predictions[0].prob:.2%})" + ("  [reference convention]" if result.reference
                                                                 else "")))
    if target.tokens is None and target.n_answer_tokens > 1:
        console.print(Text(f"Warning: the answer is {target.n_answer_tokens} tokens and only its first, "
                           f"{target.text!r}, is scored; --answer-tokens all scores every one of them.",
                           style="bold yellow"))
    if target.tokens is not None:
        console.print(Text("Answer tokens, each scored where it is predicted (teacher forcing); every score below "
                           "is their sum, and coef gives the coefficient at each of their positions: "
                           + ", ".join(f"{t.text!r} {t.prob:.2%} (rank {t.rank})" for t in target.tokens)))
    if contrast is not None:
        console.print(Text(f"Contrast {contrast.text!r} id {contrast.id}: probability {contrast.prob:.2%}, rank "
                           f"{contrast.rank}. Every score below is the increase of log p(target) − "
                           f"log p(contrast)."))
    for layout in attribution_tables(result, rows):
        _print_layout(console, layout)
    if result.quantization_residuals:
        console.print(Text(quantization_summary(result.quantization_residuals)))


def quantization_summary(residuals: list) -> str:
    """One line on a quantized model's quantisation residuals: the largest, relative and by score."""
    largest = max(residuals, key=lambda r: r.relative)
    strongest = max(residuals, key=lambda r: abs(r.score))
    return (f"Quantisation residual (what sublayers add beyond their neurons): at most {largest.relative:.2%} of a "
            f"sublayer's output ({largest.component} of layer {largest.layer}); largest score "
            f"{strongest.score:+.4f} ({strongest.component} of layer {strongest.layer}).")


TEXT_MIN_WIDTH = 10  # a column of tokens narrower than this is unreadable: it is left out instead


def _print_layout(console: Console, layout: TableLayout) -> None:
    """A layout as a rich table. Names are never cut (their column keeps its longest cell's width) and numbers
    never wrap; columns of tokens fold into what is left, and where even TEXT_MIN_WIDTH each does not fit they
    are left out from the right, with a note saying so."""
    cells = [[_cell(cell) for cell in row] for row in layout.rows]
    kept = list(range(len(layout.columns)))

    def least_width(i: int) -> int:
        column = layout.columns[i]
        if column.text and not column.whole:
            return TEXT_MIN_WIDTH
        header = Text(column.name).cell_len if column.whole else max(map(len, column.name.split() or [""]))
        return max([header, 1, *(row[i].cell_len for row in cells)])

    def needed() -> int:
        return sum(least_width(i) + 3 for i in kept) + 1  # a cell's padding and border, and the last border

    dropped = []
    while needed() > console.width:
        texts = [i for i in kept if layout.columns[i].text and not layout.columns[i].whole]
        if not texts:
            break
        kept.remove(texts[-1])
        dropped.insert(0, layout.columns[texts[-1]].name)
    table = Table(title=Text(layout.title), title_justify="left", caption=Text(layout.caption) if layout.caption
                  else None, caption_justify="left")
    for i in kept:
        column = layout.columns[i]
        if column.whole:
            table.add_column(Text(column.name), justify="left", no_wrap=True, min_width=least_width(i))
        elif column.text:
            table.add_column(Text(column.name), justify="left", overflow="fold", min_width=TEXT_MIN_WIDTH)
        else:  # a number keeps its width; its header may wrap between words
            table.add_column(Text(column.name), justify="right", overflow="fold", min_width=least_width(i))
    for row in cells:
        table.add_row(*(row[i] for i in kept))
    console.print(table)
    if dropped:
        names = ", ".join(repr(name) for name in dropped if name) or "token"
        console.print(Text(f"({names} left out at {console.width} columns: widen the terminal or read --json)",
                           style="dim"))
    for note in layout.notes:
        console.print(Text(note, style="yellow"))


def _cell(cell: Cell) -> Text:
    if isinstance(cell, Bar):
        return _bar(cell.value, cell.scale, 12)
    if isinstance(cell, Tokens):
        return Text(" ".join(repr(t) for t in cell.texts))
    return Text(cell)


def print_neuron_scores(console: Console, scores) -> None:
    """One table per prompt: each chosen neuron's exact score and coefficient."""
    for prompt, target, row, coefficients in zip(scores.prompts, scores.targets, scores.scores, scores.coefficients):
        contrast = getattr(target, "contrast", None)
        rather = "" if contrast is None else f" rather than {contrast.text!r}"
        console.rule(Text(f"{prompt!r} → {target.text!r}{rather}"))
        console.print(Text(f"Target {target.text!r} id {target.id}: probability {target.prob:.2%}, "
                           f"rank {target.rank}."))
        measure = "log-prob increase" if contrast is None else \
            f"increase of log p({target.text!r}) − log p({contrast.text!r})"
        table = Table(title=Text(f"Chosen neurons: {measure}"), title_justify="left")
        for column in ("neuron", "score", "coef"):
            if column == "neuron":  # a name is never cut
                table.add_column(column, no_wrap=True, min_width=max(len(str(n)) for n in scores.neurons))
            else:
                table.add_column(column, justify="right", no_wrap=True)
        for neuron, score, coefficient in zip(scores.neurons, row, coefficients):
            table.add_row(str(neuron), f"{score:+.4f}", "" if coefficient is None else f"{coefficient:+.3f}")
        console.print(table)


def print_evaluation(console: Console, evaluation) -> None:
    """The paper-style table: one row per method (original first), metrics after switching neurons off."""
    what = {"compare": f"each method's top-{evaluation.top} FFN neurons switched off",
            "value": f"top-{evaluation.top} value neurons (2/3 attention, 1/3 FFN) vs as many random",
            "query": f"top-{evaluation.top} query FFN neurons vs as many random FFN neurons",
            "heads": f"top {evaluation.top} heads of each type vs {evaluation.top} random heads"}[evaluation.protocol]
    title = Text(f"{evaluation.model}: {evaluation.n_sentences} sentences, {what}")
    table = Table(title=title, title_justify="left",
                  caption="a larger decrease = the neurons switched off mattered more; the MRR and prob decreases "
                          "are relative ((before − after) / before), the log p drop is before − after",
                  caption_justify="left")
    table.add_column("method", no_wrap=True)
    for column in ("MRR", "prob", "log p", "MRR\ndecrease", "prob\ndecrease", "log p\ndrop"):
        table.add_column(column, justify="right", no_wrap=True)
    best = min((m.mrr for key, m in evaluation.methods.items() if key not in ("original", "random")), default=None)
    for key, m in evaluation.methods.items():
        style = "bold" if key != "original" and m.mrr == best else None
        changes = ["", "", ""] if key == "original" else [f"{m.mrr_decrease:.1%}", f"{m.prob_decrease:.1%}",
                                                          f"{m.log_prob_drop:.3f}"]
        table.add_row(Text(key), f"{m.mrr:.3f}", f"{m.prob:.2%}", f"{m.log_prob:.3f}", *changes, style=style)
    console.print(table)
    if evaluation.filter is not None:
        f = evaluation.filter
        per_type = ", ".join(f"{kind} {c['kept']}/{c['checked']}" for kind, c in f["by_type"].items())
        console.print(Text(f"Kept by the filter (the model knows the fact): {f['kept']} of {f['checked']} "
                           f"({per_type}); --no-filter keeps every line."))
    if evaluation.by_type:
        _print_by_type(console, evaluation.by_type)
    print_skipped(console, evaluation.skipped)


def print_skipped(console: Console, skipped: list, shown: int = 10, listed_in: str = "--json") -> None:
    """Lines left out, with file and line, the first `shown` of them (all of them are in `listed_in`)."""
    if not skipped:
        return
    console.print(Text(f"Skipped {len(skipped)}:", style="yellow"))
    for s in skipped[:shown]:
        where = f"{s.source}:{s.line}" if s.line else s.source
        console.print(Text(f"  {where}: {s.reason}"), soft_wrap=True)  # a path stays whole, for copying
    if len(skipped) > shown:
        console.print(Text(f"  ... and {len(skipped) - shown} more (all listed in {listed_in})"))


def print_prompt_summary(console: Console, results: list) -> None:
    """One row per attributed line: its target and the strongest FFN neuron, attention neuron and head."""
    table = Table(title=f"{len(results)} prompts", title_justify="left")
    for column in ("line", "prompt", "target", "prob", "top FFN neuron", "top attention neuron", "top head"):
        table.add_column(column, justify="right" if column in ("line", "prob") else "left")
    for line, r in results:
        ffn, attention, head = r.ffn_neurons[0], r.attention_neurons[0], r.heads[0]
        table.add_row(str(line.line), Text(r.prompt), Text(repr(r.target.text)), f"{r.target.prob:.1%}",
                      f"{ffn.index} {ffn.score:+.3f}", f"{attention.index} {attention.score:+.3f}",
                      f"{head.index} {head.score:+.3f}")
    console.print(table)


def _print_by_type(console: Console, by_type) -> None:
    measured = sorted({kind for row in by_type.values() for kind in row})
    table = Table(title="MRR decrease by knowledge type (rows: whose heads are off; columns: measured on)",
                  title_justify="left")
    table.add_column("heads off")
    for kind in measured:
        table.add_column(kind, justify="right")
    for ablated, row in by_type.items():
        table.add_row(Text(ablated), *(f"{row[k].mrr_decrease:+.1%}" if k in row else "" for k in measured))
    console.print(table)


def print_datasets(console: Console, rows, all_name: str, knowledge_types) -> None:
    table = Table(title="Packaged datasets", title_justify="left",
                  caption=f"--dataset {all_name} runs the six knowledge types together "
                          f"({', '.join(knowledge_types)}); any JSONL file of "
                          '{"prompt", "answer", "type"} lines works too.', caption_justify="left")
    for column in ("name", "facts", "types"):
        table.add_column(column, justify="right" if column == "facts" else "left")
    for row in rows:
        types = ", ".join(f"{kind} {count}" for kind, count in row["types"].items())
        table.add_row(Text(row["name"]), str(row["facts"]), Text(types))
    console.print(table)
