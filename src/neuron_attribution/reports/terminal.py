"""Terminal reports (rich). Only presentation: everything shown is computed elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


_INFO_LABELS = [("family", "Family"), ("architecture", "Architecture"), ("layers", "Layers"),
                ("heads", "Attention heads"), ("kv_heads", "KV heads"), ("head_dim", "Head size"),
                ("hidden_size", "Hidden size"), ("ffn_neurons_per_layer", "FFN neurons per layer"),
                ("ffn_kind", "FFN type"), ("norm", "Norm"), ("block", "Block"), ("vocab_size", "Vocabulary"),
                ("max_positions", "Context length"), ("attention_neurons_per_token", "Attention neurons per token"),
                ("long_prompts", "Long prompts traced with"),
                ("dtype", "Weights dtype"), ("device", "Device"), ("source", "Weights from")]


def print_model_info(console: Console, description: dict[str, Any]) -> None:
    table = Table(title=Text(f"Model: {description['name']}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, label in _INFO_LABELS:
        table.add_row(label, Text(str(description[key])))
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
    console.rule(Text(f"{result.prompt!r} → {target.text!r}{rather}"))
    spans = f" (first of {target.n_answer_tokens} answer tokens)" if target.n_answer_tokens > 1 else ""
    if target.tokens is not None:
        spans = f" (first of {len(target.tokens)} answer tokens, all scored)"
    console.print(Text(f"Target {target.text!r} id {target.id}{spans}: probability {target.prob:.2%}, "
                       f"rank {target.rank}.  Top prediction: {result.predictions[0].token!r} "
                       f"({result.predictions[0].prob:.2%})" + ("  [reference convention]" if result.reference
                                                                 else "")))
    if target.tokens is None and target.n_answer_tokens > 1:
        console.print(Text(f"Warning: the answer is {target.n_answer_tokens} tokens and only its first, "
                           f"{target.text!r}, is scored; --answer-tokens all scores every one of them.",
                           style="bold yellow"))
    if target.tokens is not None:
        console.print(Text("Answer tokens, each scored where it is predicted (teacher forcing); every score below "
                           "is their sum: " + ", ".join(f"{t.text!r} {t.prob:.2%} (rank {t.rank})"
                                                        for t in target.tokens)))
    if contrast is not None:
        console.print(Text(f"Contrast {contrast.text!r} id {contrast.id}: probability {contrast.prob:.2%}, rank "
                           f"{contrast.rank}. Every score below is the increase of log p(target) − "
                           f"log p(contrast)."))
    measure = "log-probability increase" if contrast is None else "increase of the log-probability difference"
    layers = Table(title=f"Layer scores ({measure})", title_justify="left")
    for column in ("layer", "attention", "", "FFN", ""):
        layers.add_column(column, justify="right" if column else "left")
    scale = max(max(map(abs, result.layers.attention)), max(map(abs, result.layers.ffn)), 1e-9)
    for layer, (a, f) in enumerate(zip(result.layers.attention, result.layers.ffn)):
        layers.add_row(str(layer), f"{a:+.3f}", _bar(a, scale, 12), f"{f:+.3f}", _bar(f, scale, 12))
    layers.add_row("sum", f"{sum(result.layers.attention):+.3f}", "", f"{sum(result.layers.ffn):+.3f}", "")
    console.print(layers)

    heads = Table(title="Top heads", title_justify="left")
    for column in ("head", "score", "strongest source positions"):
        heads.add_column(column)
    with_positions = len({(p.layer, p.head) for p in result.head_positions})
    for h in result.heads[:rows]:
        sources = result.strongest_sources(h)
        shown = (", ".join(f"{p.position}:{p.token!r} {p.score:+.3f}" for p in sources) if sources
                 else f"(positions are scored for the top {with_positions} heads)")
        heads.add_row(f"{h.layer}.{h.head}", f"{h.score:+.4f}", Text(shown, style=None if sources else "dim"))
    console.print(heads)

    ffn = Table(title="Top FFN value neurons (layer_neuron)", title_justify="left")
    for column in ("neuron", "score", "coef", "promotes (coefficient × value vector)"):
        ffn.add_column(column)
    for n in result.ffn_neurons[:rows]:
        ffn.add_row(f"{n.layer}_{n.neuron}", f"{n.score:+.4f}", f"{n.coefficient:+.3f}",
                    Text(" ".join(repr(t) for t in n.promoted_tokens[:6])))
    console.print(ffn)

    attention = Table(title="Top attention value neurons (layer_head_dim @ source position)", title_justify="left")
    for column in ("neuron", "score", "coef", "source token"):
        attention.add_column(column)
    for n in result.attention_neurons[:rows]:
        attention.add_row(f"{n.layer}_{n.head}_{n.dim} @ {n.position}", f"{n.score:+.4f}", f"{n.coefficient:+.3f}",
                          Text(repr(n.token)))
    console.print(attention)

    if result.query_neurons or result.query_layers.for_ffn or result.query_layers.for_attention:
        print_queries(console, result, rows)


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
            table.add_column(column, justify="left" if column == "neuron" else "right")
        for neuron, score, coefficient in zip(scores.neurons, row, coefficients):
            table.add_row(str(neuron), f"{score:+.4f}", "" if coefficient is None else f"{coefficient:+.3f}")
        console.print(table)


def print_queries(console: Console, result, rows: int = 10) -> None:
    via = result.query_via
    queries = Table(title=f"Top query FFN neurons (activate the top {_PATH_NAMES[via]} value neurons)",
                    title_justify="left")
    # The two paths' parts beside the score only where both were taken; gate/up wherever they exist.
    parts = [("gate", lambda q: q.gate_score), ("up", lambda q: q.up_score)]
    if via == "both":
        parts = [("via attention", lambda q: q.attention_score), ("via FFN", lambda q: q.ffn_score), *parts]
    paths = [(name, pick) for name, pick in parts if any(pick(q) is not None for q in result.query_neurons)]
    located = any(q.position is not None for q in result.query_neurons)
    for column in ["neuron", "score"] + [name for name, _ in paths] + (["acts at", "coefficient"] if located else []):
        queries.add_column(column, justify="left" if column in ("neuron", "acts at") else "right")
    for q in result.query_neurons[:rows]:
        where = [Text(f"{q.position} {q.token!r}"), f"{q.coefficient:+.3f}"] if q.position is not None else \
            (["", ""] if located else [])
        queries.add_row(f"{q.layer}_{q.neuron}", f"{q.score:+.4f}", *(f"{pick(q):+.4f}" for _, pick in paths), *where)
    console.print(queries)
    layers = Table(title="Top query layers", title_justify="left")
    kinds = [(name, rows_) for name, rows_ in (("for FFN value neurons", result.query_layers.for_ffn),
                                               ("for attention value neurons", result.query_layers.for_attention))
             if rows_]
    for name, _ in kinds:
        layers.add_column(name, justify="left")
        layers.add_column("score" + " " * len(layers.columns), justify="right")
    by_score = [sorted(rows_, key=lambda r: -r.score)[:min(rows, 8)] for _, rows_ in kinds]
    for row_group in zip(*by_score):
        layers.add_row(*(cell for row in row_group for cell in (_component(row), f"{row.score:+.3f}")))
    console.print(layers)
    if result.query_skipped:
        console.print(Text(f"Skipped (input·subkey ≈ 0, or gate/up elasticities cancel): "
                           f"{', '.join(result.query_skipped)}", style="yellow"))


_PATH_NAMES = {"attention": "attention", "ffn": "FFN", "both": "attention and FFN"}


def _component(row) -> str:
    return "embedding" if row.layer is None else f"{row.component} {row.layer}"


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
        console.print(Text(f"  {where}: {s.reason}"))
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
