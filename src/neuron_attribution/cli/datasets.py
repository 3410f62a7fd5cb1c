"""Commands over datasets: evaluate, datasets, run, analyze, and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import UserError
from ..settings import ANSWER_TOKENS, DEFAULT_BATCH_SIZE, DEFAULT_MAX_MEMORY, DEFAULT_QUERY_TOP, DEFAULT_QUERY_VIA, DEFAULT_RUN_TOP, RANK_BY
from .common import (MeasureOption, AddressOption, AllowPickleOption, AnswerTokensOption, BackendOption, DeviceOption, DtypeOption,
                     GpusPerWorkerOption, MaxMemoryOption, ModelOption, QueryTopOption, QueryViaOption, RankByOption,
                     RegistryHelp, WorkersOption, app, check_backend, console, load_driver_model, load_model_spec,
                     make_backend, print_run_summary, progress_bar, settings_from_flags, warn_if_dense,
                     QuantizationOption)


@app.command(cls=RegistryHelp)
def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="A packaged dataset name (e.g. sample), a "
                                         "JSONL file of {\"prompt\", \"answer\", \"type\"?} lines, or a "
                                         "comma-separated list of them (capital,language).")],
    model: ModelOption = None,
    methods: Annotated[str, typer.Option("--methods", help="all, or a comma-separated list of methods.")] = "all",
    top: Annotated[Optional[int], typer.Option("--top", "-k", help="Neurons switched off per sentence. Default: "
                                               "10 (compare), 300 (value), 1000 (query), 1% of heads (heads).")]
    = None,
    protocol: Annotated[str, typer.Option("--protocol", help="compare, value, query or heads.")] = "compare",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N facts.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines and unusable facts: skip them "
                                          "(counted in the output) or stop.")] = "skip",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random controls.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences traced per forward pass.")] = DEFAULT_BATCH_SIZE,
    query_top: QueryTopOption = DEFAULT_QUERY_TOP,
    query_via: QueryViaOption = DEFAULT_QUERY_VIA,
    filter_facts: Annotated[bool, typer.Option("--filter/--no-filter", help="Keep only the facts the model knows "
                                               "(gold answer in its top 10, above every other candidate of its "
                                               "type), as the paper does.")] = True,
    backend: BackendOption = "local",
    workers: WorkersOption = 2,
    address: AddressOption = None,
    gpus_per_worker: GpusPerWorkerOption = None,
    max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
    quantization: QuantizationOption = None,
) -> None:
    """Switch off the neurons each method finds and measure the gold answer: MRR, probability, log probability."""
    from ..datasets import load_facts
    from ..pipelines.evaluate import check_protocol, evaluate as run_evaluation
    from ..reports.terminal import print_evaluation
    from ..scoring.methods import resolve_methods

    check_protocol(protocol)
    for name, number in (("--limit", limit), ("--top", top), ("--batch-size", batch_size)):
        if number is not None and number <= 0:
            raise UserError(f"{name} must be a positive number")
    resolve_methods(methods)  # unknown names fail before the model loads
    settings = settings_from_flags(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                   quantization=quantization,
                                   query_top=query_top, max_memory=max_memory, query_via=query_via)
    check_backend(backend, workers, address, settings, gpus_per_worker)
    facts, skipped = load_facts(dataset, on_error)  # type: ignore[arg-type]
    facts = facts[:limit] if limit else facts
    loaded, settings = load_driver_model(settings, backend)
    with make_backend(backend, loaded, settings, workers, address, gpus_per_worker) as pool, \
            progress_bar() as progress:
        result = run_evaluation(loaded, facts, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, on_error=on_error, skipped=skipped,  # type: ignore[arg-type]
                                progress=progress, backend=pool, filter=filter_facts)
    print_evaluation(console, result)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")


@app.command()
def datasets() -> None:
    """List the packaged datasets with their fact counts per knowledge type."""
    from ..datasets import ALL_TYPES, KNOWLEDGE_TYPES, describe_datasets
    from ..reports.terminal import print_datasets

    print_datasets(console, describe_datasets(), ALL_TYPES, KNOWLEDGE_TYPES)


@app.command()
def run(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="knowledge (all six types), one type (language, "
                                         "capital, country, color, number, month), sample, a JSONL file, or a "
                                         "comma-separated list of them (capital,language).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the Parquet tables (resumable).")]
    = Path("out/run"),
    model: ModelOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N kept sentences of each type.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences per forward pass.")] = DEFAULT_BATCH_SIZE,
    top: Annotated[int, typer.Option("--top", "-k", help="Value and query neurons stored per sentence.")] = DEFAULT_RUN_TOP,
    query_top: QueryTopOption = DEFAULT_QUERY_TOP,
    query_via: QueryViaOption = DEFAULT_QUERY_VIA,
    answer_tokens: AnswerTokensOption = ANSWER_TOKENS[0],
    rank_by: RankByOption = RANK_BY[0],
    measure: MeasureOption = 0,
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines: skip them or stop.")] = "skip",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different run already in --out "
                                            "(only the run's own files are removed).")] = False,
    backend: BackendOption = "local",
    workers: WorkersOption = 2,
    address: AddressOption = None,
    gpus_per_worker: GpusPerWorkerOption = None,
    max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
    quantization: QuantizationOption = None,
) -> None:
    """Attribute every sentence of a dataset the model knows (the paper's filter) into Parquet tables."""
    from ..datasets import load_facts
    from ..pipelines.run import RunArguments, run_dataset
    from ..pipelines.run_store import check_can_write, run_lock

    for name, number in (("--limit", limit), ("--batch-size", batch_size)):
        if number is not None and number <= 0:
            raise UserError(f"{name} must be a positive number")
    settings = settings_from_flags(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                   quantization=quantization, top=top,
                                   query_top=query_top, max_memory=max_memory, query_via=query_via,
                                   answer_tokens=answer_tokens, rank_by=rank_by, measure=measure)
    load_facts(dataset, on_error)  # type: ignore[arg-type]  # a bad dataset fails before the model loads
    check_can_write(out)
    check_backend(backend, workers, address, settings, gpus_per_worker)
    try:
        with run_lock(out):  # before the model loads: a directory in use is refused at once
            loaded, settings = load_driver_model(settings, backend)
            warn_if_dense(loaded.shape, top)
            with make_backend(backend, loaded, settings, workers, address, gpus_per_worker) as pool, \
                    progress_bar() as progress:
                summary = run_dataset(loaded, out, RunArguments(dataset, limit, on_error), settings=settings,
                                      batch_size=batch_size, progress=progress, backend=pool, overwrite=overwrite)
    except KeyboardInterrupt:
        _say_how_to_resume(out)
        raise typer.Exit(130) from None
    print_run_summary(summary, out)


def _say_how_to_resume(out: Path) -> None:
    """After Ctrl-C: what is kept, and that the same command picks up from there."""
    from rich.console import Console

    from ..pipelines.run_store import completed_ids

    parts = out / "parts"
    saved = len(completed_ids(parts)) if parts.is_dir() else 0
    Console(stderr=True).print(f"run stopped: {saved} sentences are saved in {escape(str(out))}; run the same "
                               "command again to resume from there", highlight=False, soft_wrap=True)


@app.command()
def analyze(
    directory: Annotated[Path, typer.Argument(help="A finished `run` directory.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the plots, analysis.json "
                                                "and report.html. Default: DIR/analysis.")] = None,
    interventions: Annotated[bool, typer.Option("--interventions/--no-interventions", help="Also switch off "
                                                "value neurons, query neurons and heads per type (loads the "
                                                "model).")] = True,
    per_type: Annotated[int, typer.Option("--per-type", help="Sentences of each type used for the "
                                          "interventions.")] = 20,
    device: Annotated[Optional[str], typer.Option("--device", help="Load the model on this device instead of the "
                                                  "run's own (recorded in its run.json).")] = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Reproduce the paper's analyses on a run: layer scores, histograms, head overlap, sharing, interventions."""
    from dataclasses import replace

    from ..pipelines.analyze import analyze_run
    from ..pipelines.run_store import run_lock
    from ..reports.html import write_report

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    target = out or directory / "analysis"

    def load(spec):
        spec = replace(spec, allow_pickle=spec.allow_pickle or allow_pickle)
        return load_model_spec(spec if device is None else replace(spec, device=device))

    with run_lock(directory), progress_bar() as progress:  # `run --overwrite` would remove what is read and written
        analysis = analyze_run(directory, interventions=interventions, per_type=per_type, progress=progress,
                               load=load)
        report = write_report(analysis, target)
    console.print(f"Report: {escape(str(report))}")


@app.command()
def demo(model: ModelOption = None,
         out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the run and its report.")]
         = Path("out/demo"),
         per_type: Annotated[int, typer.Option("--per-type", help="Sentences of each knowledge type.")] = 4,
         quantization: QuantizationOption = None) -> None:
    """The main job on the offline default model: explain two predictions, then run and analyse a slice of
    every knowledge type and write the HTML report."""
    import time

    from ..model.describe import describe_model
    from ..pipelines.analyze import analyze_run
    from ..pipelines.attribute import attribute as run_attribution
    from ..pipelines.run import RunArguments, run_dataset, run_settings
    from ..reports.html import write_report
    from ..reports.terminal import print_attribution, print_model_info

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    started = time.perf_counter()
    settings = settings_from_flags(model, quantization=quantization)
    loaded = load_model_spec(settings.model)
    print_model_info(console, describe_model(loaded))
    for prompt, answer in (("The capital of France is", " Paris"), ("The largest planet is", " Jupiter")):
        print_attribution(console, run_attribution(loaded, prompt, answer, top_k=100), rows=5)
    console.rule(f"{per_type} sentences of each knowledge type: run and analyse")
    with progress_bar() as progress:
        summary = run_dataset(loaded, out, RunArguments("knowledge", per_type),
                              settings=run_settings(loaded), progress=progress,
                              overwrite=True)
        analysis = analyze_run(out, per_type=per_type, progress=progress, load=lambda spec: loaded)
        report = write_report(analysis, out / "analysis")
    console.print("Kept by the filter (kept/checked): "
                  + ", ".join(f"{k} {summary.kept[k]}/{n}" for k, n in summary.facts.items()))
    console.print(f"Done in {time.perf_counter() - started:.0f} s. Report: {escape(str(report.resolve()))}")

