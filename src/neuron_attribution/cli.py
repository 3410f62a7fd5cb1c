"""Command-line interface: thin wrappers over the library, one subcommand per task. Each command builds its
`Settings` once from its flags and hands them to everything it runs (backends, workers, run.json)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the neurons of a causal language model responsible for a prediction.")
console = Console()

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Local directory, .gguf file or hub id. Default: the offline SmolLM2-135M-Instruct.")]
AllowPickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Allow pickle checkpoints (.bin/.pt), which can run code when loaded.")]
MaxMemoryOption = Annotated[str, typer.Option("--max-memory", help="Memory the scoring step's vocabulary-sized "
                                              "buffers may take, e.g. 2GB or 500MB.")]
BackendOption = Annotated[str, typer.Option("--backend", help=escape(
    "local, or ray: batches on Ray workers that each load the model once (pip install "
    "'neuron-attribution[ray]')."))]
WorkersOption = Annotated[int, typer.Option("--workers", help="Ray workers (a local cluster of this many CPUs "
                                            "unless --address is given).")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="An existing Ray cluster to join.")]
DtypeOption = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu (default), cuda, cuda:1, ... or auto "
                                                     "(layers spread over the GPUs). Scores are float32 either way.")]
QueryTopOption = Annotated[int, typer.Option("--query-top", help="Score query neurons and layers for this many "
                                             "top value neurons of each kind (0: no query neurons).")]


def _settings(model: str | None, *, dtype: str | None = None, device: str | None = None,
              allow_pickle: bool = False, top: int | None = None, query_top: int | None = None,
              max_memory: str | None = None, reference: bool = False):
    """The command's settings, checked before anything slow happens."""
    from .settings import ModelSpec, ScoringOptions, Settings, parse_size

    scoring: dict = {"reference": reference}
    for key, value in (("top_k", top), ("query_top", query_top)):
        if value is not None:
            scoring[key] = value
    if max_memory is not None:
        scoring["memory_budget"] = parse_size(max_memory)
    if top is not None and top <= 0:
        raise UserError("--top must be a positive number")
    if query_top is not None and query_top < 0:
        raise UserError("--query-top must be 0 or more (0: no query neurons)")
    return Settings(ModelSpec(model, dtype, device, allow_pickle), ScoringOptions(**scoring))


def _load(spec):
    from .model.loading import load

    with console.status("Loading model...", spinner="dots"):
        return load(spec)


def _as_loaded(settings, loaded):
    """The settings with the model spec as loading normalised it (absolute path, canonical dtype name)."""
    from .settings import Settings

    return Settings(loaded.spec, settings.scoring)


@app.command()
def info(model: ModelOption = None, json_file: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the description as JSON to this file.")] = None,
        allow_pickle: AllowPickleOption = False) -> None:
    """Describe a model: family, sizes, neuron counts and where the weights came from."""
    from .files import write_json
    from .model.describe import describe_model
    from .reports.terminal import print_model_info

    loaded = _load(_settings(model, allow_pickle=allow_pickle).model)
    description = describe_model(loaded)
    print_model_info(console, description)
    if json_file:
        write_json(json_file, description)


@app.command()
def predict(prompt: Annotated[str, typer.Argument(help="The prompt whose next token is predicted.")],
            model: ModelOption = None, top: Annotated[int, typer.Option("--top", help="How many tokens.")] = 10,
            allow_pickle: AllowPickleOption = False) -> None:
    """Show the model's top next-token predictions for a prompt."""
    from .pipelines.predict import predict_next
    from .reports.terminal import print_predictions

    if top <= 0:
        raise UserError("--top must be a positive number")
    loaded = _load(_settings(model, allow_pickle=allow_pickle).model)
    print_predictions(console, prompt, predict_next(loaded, prompt, top))


@app.command()
def attribute(
    prompt: Annotated[str, typer.Argument(help="The prompt, e.g. \"The capital of France is\".")],
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Answer text (its first token is "
                                                  "scored). Default: the model's top prediction.")] = None,
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", "-k", help="How many FFN and attention neurons to return.")] = 100,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the full result as JSON.")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="Drop the final LayerNorm bias, as the "
                                            "authors' GPT-2 code does.")] = False,
    show: Annotated[int, typer.Option("--show", help="Rows per table in the terminal report.")] = 10,
    query_top: QueryTopOption = 30,
    max_memory: MaxMemoryOption = "2GB",
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Value neurons: which FFN and attention neurons raise the log probability of the answer."""
    from .pipelines.attribute import attribute_with
    from .reports.terminal import print_attribution

    if show <= 0:
        raise UserError("--show must be a positive number")
    settings = _settings(model, dtype=dtype, device=device, allow_pickle=allow_pickle, top=top,
                         query_top=query_top, max_memory=max_memory, reference=reference)
    loaded = _load(settings.model)
    with console.status("Attributing...", spinner="dots"):
        (result,) = attribute_with(loaded, [prompt], None if target is None else [target], settings.scoring)
    print_attribution(console, result, rows=show)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")


def _methods_help() -> str:
    from .scoring.methods import ALL, methods_help

    return escape(f"{ALL} (every method but those marked), or a comma-separated list of: {methods_help()}.")


def _protocols_help() -> str:
    from .pipelines.evaluate import protocols_help

    return escape(f"{protocols_help()}.")


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="A packaged dataset name (e.g. sample) or a "
                                         "JSONL file of {\"prompt\", \"answer\", \"type\"?} lines.")],
    model: ModelOption = None,
    methods: Annotated[str, typer.Option("--methods", help=_methods_help())] = "all",
    top: Annotated[Optional[int], typer.Option("--top", "-k", help="Neurons switched off per sentence. Default: "
                                               "10 (compare), 300 (value), 1000 (query), 1% of heads (heads).")]
    = None,
    protocol: Annotated[str, typer.Option("--protocol", help=_protocols_help())] = "compare",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N facts.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines and unusable facts: skip them "
                                          "(counted in the output) or stop.")] = "skip",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random controls.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences traced per forward pass.")] = 8,
    query_top: QueryTopOption = 30,
    backend: BackendOption = "local",
    workers: WorkersOption = 2,
    address: AddressOption = None,
    max_memory: MaxMemoryOption = "2GB",
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Switch off the neurons each method finds and measure the gold answer: MRR, probability, log probability."""
    from .datasets import load_facts
    from .pipelines.evaluate import check_protocol, evaluate as run_evaluation
    from .reports.terminal import print_evaluation
    from .scoring.methods import resolve_methods

    check_protocol(protocol)
    for name, number in (("--limit", limit), ("--top", top), ("--batch-size", batch_size)):
        if number is not None and number <= 0:
            raise UserError(f"{name} must be a positive number")
    resolve_methods(methods)  # unknown names fail before the model loads
    settings = _settings(model, dtype=dtype, device=device, allow_pickle=allow_pickle, query_top=query_top,
                         max_memory=max_memory)
    _check_backend(backend, workers)
    facts, skipped = load_facts(dataset, on_error)  # type: ignore[arg-type]
    facts = facts[:limit] if limit else facts
    loaded = _load(settings.model)
    settings = _as_loaded(settings, loaded)
    with _backend(backend, loaded, settings, workers, address) as pool, _progress_bar() as progress:
        result = run_evaluation(loaded, facts, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, on_error=on_error, skipped=skipped,  # type: ignore[arg-type]
                                progress=progress, backend=pool)
    print_evaluation(console, result)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")


@app.command()
def datasets() -> None:
    """List the packaged datasets with their fact counts per knowledge type."""
    from .datasets import ALL_TYPES, KNOWLEDGE_TYPES, describe_datasets
    from .reports.terminal import print_datasets

    print_datasets(console, describe_datasets(), ALL_TYPES, KNOWLEDGE_TYPES)


@app.command()
def run(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="knowledge (all six types), one type (language, "
                                         "capital, country, color, number, month), sample, or a JSONL file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the Parquet tables (resumable).")]
    = Path("out/run"),
    model: ModelOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N kept sentences of each type.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences per forward pass.")] = 8,
    top: Annotated[int, typer.Option("--top", "-k", help="Value and query neurons stored per sentence.")] = 300,
    query_top: QueryTopOption = 30,
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines: skip them or stop.")] = "skip",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different run already in --out "
                                            "(only the run's own files are removed).")] = False,
    backend: BackendOption = "local",
    workers: WorkersOption = 2,
    address: AddressOption = None,
    max_memory: MaxMemoryOption = "2GB",
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Attribute every sentence of a dataset the model knows (the paper's filter) into Parquet tables."""
    from .datasets import load_facts
    from .pipelines.run import RunArguments, run_dataset

    for name, number in (("--limit", limit), ("--batch-size", batch_size)):
        if number is not None and number <= 0:
            raise UserError(f"{name} must be a positive number")
    settings = _settings(model, dtype=dtype, device=device, allow_pickle=allow_pickle, top=top,
                         query_top=query_top, max_memory=max_memory)
    load_facts(dataset, on_error)  # type: ignore[arg-type]  # a bad dataset fails before the model loads
    _check_backend(backend, workers)
    loaded = _load(settings.model)
    settings = _as_loaded(settings, loaded)
    with _backend(backend, loaded, settings, workers, address) as pool, _progress_bar() as progress:
        summary = run_dataset(loaded, out, RunArguments(dataset, limit, on_error), settings=settings,
                              batch_size=batch_size, progress=progress, backend=pool, overwrite=overwrite)
    _print_run_summary(summary, out)


def _print_run_summary(summary, out: Path) -> None:
    kept = ", ".join(f"{kind} {summary.kept[kind]}/{total}" for kind, total in summary.facts.items())
    console.print(f"Kept by the filter (kept/checked; with --limit a type stops once it has enough): {kept}")
    if summary.used != summary.kept:
        console.print("Used (--limit): " + ", ".join(f"{kind} {n}" for kind, n in summary.used.items()))
    console.print(f"Attributed {summary.attributed} sentences ({summary.already_done} were already done) in "
                  f"{summary.seconds:.0f} s. Tables in {escape(str(out))}")


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

    from .pipelines.analyze import analyze_run
    from .reports.html import write_report

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    target = out or directory / "analysis"

    def load(spec):
        spec = replace(spec, allow_pickle=spec.allow_pickle or allow_pickle)
        return _load(spec if device is None else replace(spec, device=device))

    with _progress_bar() as progress:
        analysis = analyze_run(directory, interventions=interventions, per_type=per_type, progress=progress,
                               load=load)
        report = write_report(analysis, target)
    console.print(f"Report: {escape(str(report))}")


def _check_backend(name: str, workers: int) -> None:
    """Backend flags fail before the model loads."""
    if name not in ("local", "ray"):
        raise UserError(f"unknown backend {name!r}; use local or ray")
    if workers <= 0:
        raise UserError("--workers must be a positive number")
    if name == "ray":
        from .execution.ray_backend import require_ray

        require_ray()


@contextmanager
def _backend(name: str, loaded, settings, workers: int, address: str | None):
    """The backend a command's batches run on: here, or Ray workers (stopped on leaving). The name was
    checked by `_check_backend` before the model loaded."""
    from .execution import LocalBackend

    if name == "local":
        yield LocalBackend(loaded, settings)
        return
    from .execution.ray_backend import RayBackend

    with console.status(f"Starting {workers} Ray workers...", spinner="dots"):
        pool = RayBackend(settings, workers=workers, address=address)
    with pool:
        yield pool


@contextmanager
def _progress_bar():
    """A rich progress bar driven by (what, done, total) calls, one task per distinct `what`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield update


@app.command()
def demo(model: ModelOption = None,
         out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the run and its report.")]
         = Path("out/demo"),
         per_type: Annotated[int, typer.Option("--per-type", help="Sentences of each knowledge type.")] = 4) -> None:
    """The main job on the offline default model: explain two predictions, then run and analyse a slice of
    every knowledge type and write the HTML report."""
    import time

    from .model.describe import describe_model
    from .pipelines.analyze import analyze_run
    from .pipelines.attribute import attribute as run_attribution
    from .pipelines.run import RunArguments, run_dataset
    from .reports.html import write_report
    from .reports.terminal import print_attribution, print_model_info
    from .settings import ScoringOptions, Settings

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    started = time.perf_counter()
    settings = _settings(model)
    loaded = _load(settings.model)
    print_model_info(console, describe_model(loaded))
    for prompt, answer in (("The capital of France is", " Paris"), ("The largest planet is", " Jupiter")):
        print_attribution(console, run_attribution(loaded, prompt, answer, top_k=100), rows=5)
    console.rule(f"{per_type} sentences of each knowledge type: run and analyse")
    with _progress_bar() as progress:
        summary = run_dataset(loaded, out, RunArguments("knowledge", per_type),
                              settings=Settings(loaded.spec, ScoringOptions(top_k=300)), progress=progress,
                              overwrite=True)
        analysis = analyze_run(out, per_type=per_type, progress=progress, load=lambda spec: loaded)
        report = write_report(analysis, out / "analysis")
    console.print("Kept by the filter (kept/checked): "
                  + ", ".join(f"{k} {summary.kept[k]}/{n}" for k, n in summary.facts.items()))
    console.print(f"Done in {time.perf_counter() - started:.0f} s. Report: {escape(str(report.resolve()))}")


def main() -> None:
    try:
        app()
    except UserError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
