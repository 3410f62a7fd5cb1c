"""Commands about one prompt or one model: info, cache, predict, attribute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import UserError
from ..settings import ANSWER_TOKENS, DEFAULT_BATCH_SIZE, DEFAULT_MAX_MEMORY, DEFAULT_QUERY_TOP, DEFAULT_QUERY_VIA, DEFAULT_TOP_K, RANK_BY
from .common import (MeasureOption, AllowPickleOption, AnswerTokensOption, DeviceOption, DtypeOption, MaxMemoryOption, ModelOption,
                     QueryTopOption, QueryViaOption, RankByOption, app, console, load_model_spec, parse_neurons,
                     progress_bar, settings_from_flags, warn_if_dense,
                     QuantizationOption)


@app.command()
def info(model: ModelOption = None, json_file: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the description as JSON to this file.")] = None,
        allow_pickle: AllowPickleOption = False, quantization: QuantizationOption = None) -> None:
    """Describe a model: family, sizes, neuron counts and where the weights came from."""
    from ..files import write_json
    from ..model.describe import describe_model
    from ..reports.terminal import print_model_info

    loaded = load_model_spec(settings_from_flags(model, quantization=quantization, allow_pickle=allow_pickle).model)
    description = describe_model(loaded)
    print_model_info(console, description)
    if json_file:
        write_json(json_file, description)


@app.command()
def cache(remove: Annotated[Optional[list[str]], typer.Option("--remove", help="Remove this entry (repeatable; "
                                                              "names as listed).")] = None,
          stale: Annotated[bool, typer.Option("--stale", help="Remove the entries nothing will use again (old "
                                              "format, unfinished).")] = False,
          clear: Annotated[bool, typer.Option("--clear", help="Remove every entry.")] = False) -> None:
    """List the converted-model cache (dequantised GGUF models, joined files) with sizes; remove entries."""
    from ..model.model_cache import cache_entries, cache_root, remove_entry
    from ..reports.terminal import print_cache
    from ..settings import format_size

    if sum((bool(remove), stale, clear)) > 1:
        raise UserError("give one of --remove NAME, --stale or --clear")
    names = ([e.name for e in cache_entries() if not e.in_use and (clear or (stale and e.stale))] if clear or stale
             else (remove or []))
    if remove or stale or clear:
        removed = [remove_entry(name) for name in names]
        console.print(f"Removed {len(removed)} entries, {format_size(sum(e.size for e in removed))}, from "
                      f"{escape(str(cache_root()))}")
        return
    print_cache(console, cache_root(), cache_entries())


@app.command()
def predict(prompt: Annotated[str, typer.Argument(help="The prompt whose next token is predicted.")],
            model: ModelOption = None, top: Annotated[int, typer.Option("--top", help="How many tokens.")] = 10,
            allow_pickle: AllowPickleOption = False, quantization: QuantizationOption = None) -> None:
    """Show the model's top next-token predictions for a prompt."""
    from ..pipelines.predict import predict_next
    from ..reports.terminal import print_predictions

    if top <= 0:
        raise UserError("--top must be a positive number")
    loaded = load_model_spec(settings_from_flags(model, quantization=quantization, allow_pickle=allow_pickle).model)
    print_predictions(console, prompt, predict_next(loaded, prompt, top))


@app.command()
def attribute(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt, e.g. \"The capital of France is\".")] = None,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Answer text (its first token is "
                                                  "scored). Default: the model's top prediction.")] = None,
    target_id: Annotated[Optional[int], typer.Option("--target-id", help="A token id to score instead of "
                                                     "answer text (--target is always read as text).")] = None,
    contrast: Annotated[Optional[str], typer.Option("--contrast", help="Score log p(target) − log p(contrast): "
                                                    "\"Paris rather than London\" (text; its first token).")]
    = None,
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", "-k", help="How many FFN and attention neurons to return.")] = DEFAULT_TOP_K,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the full result as JSON.")] = None,
    graph_file: Annotated[Optional[Path], typer.Option("--graph", help="Write the circuit as JSON: the top value "
                                                       "neurons and, hop by hop, the neurons and tokens that feed "
                                                       "them, exact flows, pruned by influence (README, "
                                                       "\"Circuits\").")] = None,
    graph_format: Annotated[str, typer.Option("--graph-format", help="native (this project's schema) or "
                                              "circuit-tracer (the JSON circuit-tracer's frontend and Neuronpedia's "
                                              "graph viewer read).")] = "native",
    one_hop: Annotated[bool, typer.Option("--one-hop", help="--graph and --html give the one-hop graph instead: "
                                          "value neurons, their query neurons and source tokens (README, \"The "
                                          "attribution graph\").")] = False,
    graph_top: Annotated[int, typer.Option("--graph-top", help="Value neurons the graph starts from (by "
                                           "|score|).")] = 20,
    sinks: Annotated[bool, typer.Option("--sinks", help="Keep neurons that read the first token (the attention "
                                        "sink, marked ⚓ in the tables) in the one-hop --graph; left out by default "
                                        "(the --html pages have a toggle).")] = False,
    html_file: Annotated[Optional[Path], typer.Option("--html", help="Write one self-contained interactive page of "
                                                      "the attribution graph (works offline).")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="Drop the final LayerNorm bias, as the "
                                            "authors' GPT-2 code does.")] = False,
    show: Annotated[int, typer.Option("--show", help="Rows per table in the terminal report.")] = 10,
    query_top: QueryTopOption = DEFAULT_QUERY_TOP,
    query_via: QueryViaOption = DEFAULT_QUERY_VIA,
    answer_tokens: AnswerTokensOption = ANSWER_TOKENS[0],
    rank_by: RankByOption = RANK_BY[0],
    measure: MeasureOption = 0,
    neurons: Annotated[Optional[str], typer.Option("--neurons", help="Score only these neurons, exactly and fast, "
                                                   "e.g. 24_177,23_4_38@3,21.19 (FFN layer_neuron, attention "
                                                   "layer_head_dim@position, head layer.head; in a mixture of "
                                                   "experts 12_e3_45 an expert's neuron, 12_e3 a whole "
                                                   "expert).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="A JSONL file of {\"prompt\", \"target\"?} "
                                                    "lines: attribute them all in one process (no filter).")] = None,
    json_dir: Annotated[Optional[Path], typer.Option("--json-dir", help="With --prompts: write one JSON per "
                                                     "line into this directory.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="With --prompts: lines that are malformed or that "
                                          "the model cannot take are skipped (and listed) or stop the run.")]
    = "skip",
    batch_size: Annotated[int, typer.Option("--batch-size", help="With --prompts: prompts per forward pass.")] = DEFAULT_BATCH_SIZE,
    max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
    quantization: QuantizationOption = None,
) -> None:
    """Value neurons: which FFN and attention neurons raise the log probability of the answer."""
    from ..pipelines.attribute import attribute_with
    from ..reports.terminal import print_attribution

    if show <= 0:
        raise UserError("--show must be a positive number")
    if graph_format not in ("native", "circuit-tracer"):
        raise UserError(f"--graph-format {graph_format!r}: native or circuit-tracer")
    if graph_format == "circuit-tracer" and one_hop:
        raise UserError("--graph-format circuit-tracer writes a circuit; leave out --one-hop")
    if graph_top <= 0:
        raise UserError("--graph-top must be a positive number")
    if (graph_file is not None or html_file is not None) and (neurons is not None or prompts is not None):
        raise UserError("--graph and --html take one prompt's attribution, not --neurons or --prompts")
    if (prompt is None) == (prompts is None):
        raise UserError("give either a prompt or --prompts FILE")
    if target_id is not None:
        if target is not None:
            raise UserError("give --target (answer text) or --target-id (a token id), not both")
        if target_id < 0:
            raise UserError(f"--target-id {target_id}: a token id is 0 or more")
        if prompts is not None:
            raise UserError("with --prompts, give each line its own \"target\" (text, or a token id as a number)")
        target = target_id  # type: ignore[assignment]
    settings = settings_from_flags(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                   quantization=quantization, top=top,
                                   query_top=query_top, max_memory=max_memory, reference=reference,
                                   query_via=query_via, answer_tokens=answer_tokens, rank_by=rank_by, measure=measure)
    if prompts is not None:
        if contrast is not None:
            raise UserError("with --prompts, give each line its own \"contrast\"; --contrast takes one prompt")
        return _attribute_file(prompts, json_dir, on_error, batch_size, settings, neurons, json_file)
    chosen = parse_neurons(neurons) if neurons is not None else None
    loaded = load_model_spec(settings.model)
    if chosen is not None:
        from ..pipelines.score import score_neurons
        from ..reports.terminal import print_neuron_scores

        result = score_neurons(loaded, prompt, target, chosen, reference=reference,
                               memory_budget=settings.scoring.memory_budget, contrast=contrast)
        print_neuron_scores(console, result)
    else:
        from ..scoring.progress import reporting

        warn_if_dense(loaded.shape, top)
        # long scoring (every neuron) shows a bar with an ETA; a second's work a spinner
        with console.status("Attributing...", spinner="dots") as spinner, progress_bar() as progress, \
                reporting(lambda what, done, total: (spinner.stop(), progress(what, done, total))):
            (result,) = attribute_with(loaded, [prompt], None if target is None else [target], settings.scoring,
                                       contrasts=[contrast])
        print_attribution(console, result, rows=show)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")
    if graph_file or html_file:
        _write_graphs(loaded, prompt, target, contrast, result, settings, graph_file, html_file, graph_format,
                      one_hop, graph_top, sinks)


def _write_graphs(loaded, prompt, target, contrast, result, settings, graph_file, html_file, graph_format: str,
                  one_hop: bool, top: int, sinks: bool) -> None:
    """--graph and --html: the circuit (a prompt under 64 tokens), else, or with --one-hop, the one-hop graph."""
    from ..files import write_bytes_atomic, write_json
    from ..model.forward import FAST_ATTENTION_FROM_TOKENS
    from ..model.prompts import encode_prompt
    from ..pipelines.circuit import CircuitSettings, circuit
    from ..reports.graph_page import circuit_page, graph_page

    ids = encode_prompt(loaded, prompt)
    if not one_hop and len(ids) >= FAST_ATTENTION_FROM_TOKENS:
        if graph_format == "circuit-tracer":
            raise UserError(f"a circuit reads every position's attention rows: prompts under "
                            f"{FAST_ATTENTION_FROM_TOKENS} tokens (this one has {len(ids)})")
        console.print(f"The prompt has {len(ids)} tokens; circuits are for prompts under {FAST_ATTENTION_FROM_TOKENS} "
                      "(they read every position's attention rows): writing the one-hop graph.")
        one_hop = True
    if one_hop:
        everything = len(result.ffn_neurons) + len(result.attention_neurons)  # the page's control picks among them
        graph, page = result.graph(top=top, sinks=sinks), graph_page(result.graph(top=max(1, everything), sinks=True))
    else:
        with console.status("Tracing the circuit...", spinner="dots"):
            graph = circuit(loaded, ids, target, settings=CircuitSettings(values=top), options=settings.scoring,
                            contrast=contrast)
        graph["prompt"] = result.prompt
        page = circuit_page(graph)
        if graph_format == "circuit-tracer":
            from ..results.circuit_tracer import circuit_tracer_graph

            shape = loaded.shape
            graph = circuit_tracer_graph(graph, ids, shape.d_ffn, shape.head_dim,
                                         slug=(graph_file or html_file).stem)
    if graph_file:
        write_json(graph_file, graph)
        console.print(f"Wrote {escape(str(graph_file))} ({len(graph['nodes'])} nodes, {len(graph['links'])} links)")
        if graph_format == "circuit-tracer":
            _list_for_circuit_tracer(graph_file, graph["metadata"])
    if html_file:
        write_bytes_atomic(html_file, page.encode("utf-8"))
        console.print(f"Wrote {escape(str(html_file))} (self-contained; open it in a browser)")



def _list_for_circuit_tracer(graph_file: Path, metadata: dict) -> None:
    """circuit-tracer's local server offers the graphs listed in its data folder's graph-metadata.json: list this
    one there (a listing that is not JSON is left alone, with a note)."""
    import json

    from ..files import write_json
    from ..results.circuit_tracer import graphs_listed

    listing_file = graph_file.parent / "graph-metadata.json"
    try:
        listing = json.loads(listing_file.read_text(encoding="utf-8")) if listing_file.exists() else None
    except (OSError, ValueError) as error:
        console.print(f"Left {escape(str(listing_file))} alone (not readable JSON: {escape(str(error))}); "
                      "circuit-tracer's server lists the graphs named there")
        return
    write_json(listing_file, graphs_listed(listing if isinstance(listing, dict) else None, metadata))
    console.print(f"Listed it in {escape(str(listing_file))} for circuit-tracer's local server "
                  "(`circuit_tracer.frontend.local_server.serve(data_dir)`)")


def _attribute_file(path: Path, json_dir: Path | None, on_error: str, batch_size: int, settings, neurons,
                    json_file) -> None:
    """`attribute --prompts FILE`: every line in one process, one JSON per line, a summary table."""
    from ..datasets import load_prompt_lines
    from ..pipelines.prompts_file import attribute_lines
    from ..reports.terminal import print_prompt_summary, print_skipped

    if neurons is not None or json_file is not None:
        raise UserError("--prompts writes one JSON per line with --json-dir; --neurons and --json take one prompt")
    if batch_size <= 0:
        raise UserError("--batch-size must be a positive number")
    lines, skipped = load_prompt_lines(path, on_error)  # type: ignore[arg-type]
    loaded = load_model_spec(settings.model)
    with progress_bar() as progress:
        results, not_usable = attribute_lines(loaded, lines, settings.scoring, on_error=on_error,  # type: ignore
                                              batch_size=batch_size, progress=progress)
    if json_dir is not None:
        for line, result in results:
            result.save(json_dir / f"line-{line.line:06d}.json")
    print_prompt_summary(console, results)
    print_skipped(console, [*skipped, *not_usable])
    if json_dir is not None:
        console.print(f"Wrote {len(results)} JSON files to {escape(str(json_dir))}")
