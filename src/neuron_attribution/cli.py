"""Command-line interface: thin wrappers over the library, one subcommand per task."""

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
BackendOption = Annotated[str, typer.Option("--backend", help="local, or ray: batches on Ray workers that each "
                                            "load the model once (pip install 'neuron-attribution[ray]').")]
WorkersOption = Annotated[int, typer.Option("--workers", help="Ray workers (a local cluster of this many CPUs "
                                            "unless --address is given).")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="An existing Ray cluster to join.")]
DtypeOption = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu (default), cuda, cuda:1, ... or auto "
                                                     "(layers spread over the GPUs). Scores are float32 either way.")]


def _load(model: str | None, allow_pickle: bool = False, dtype: str | None = None, device: str | None = None):
    from .loading import load_model

    with console.status("Loading model...", spinner="dots"):
        return load_model(model, allow_pickle=allow_pickle, dtype=dtype, device=device)


@app.command()
def info(model: ModelOption = None, json_file: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the description as JSON to this file.")] = None,
        allow_pickle: AllowPickleOption = False) -> None:
    """Describe a model: family, sizes, neuron counts and where the weights came from."""
    from .describe import describe_model
    from .output import write_json
    from .report import print_model_info

    loaded = _load(model, allow_pickle)
    description = describe_model(loaded)
    print_model_info(console, description)
    if json_file:
        write_json(json_file, description)


@app.command()
def predict(prompt: Annotated[str, typer.Argument(help="The prompt whose next token is predicted.")],
            model: ModelOption = None, top: Annotated[int, typer.Option("--top", help="How many tokens.")] = 10,
            allow_pickle: AllowPickleOption = False) -> None:
    """Show the model's top next-token predictions for a prompt."""
    from .prediction import predict_next
    from .report import print_predictions

    if top <= 0:
        raise UserError("--top must be a positive number")
    loaded = _load(model, allow_pickle)
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
    query_top: Annotated[int, typer.Option("--query-top", help="Score query neurons and layers for this many "
                                           "top value neurons of each kind.")] = 30,
    max_memory: MaxMemoryOption = "2GB",
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Value neurons: which FFN and attention neurons raise the log probability of the answer."""
    from .attribution import attribute as run_attribution
    from .report import print_attribution

    if top <= 0:
        raise UserError("--top must be a positive number")
    if show <= 0:
        raise UserError("--show must be a positive number")
    if query_top <= 0:
        raise UserError("--query-top must be a positive number")
    _apply_memory_budget(max_memory)
    loaded = _load(model, allow_pickle, dtype, device)
    with console.status("Attributing...", spinner="dots"):
        result = run_attribution(loaded, prompt, target, top_k=top, reference=reference, query_top=query_top)
    print_attribution(console, result, rows=show)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="A packaged dataset name (e.g. sample) or a "
                                         "JSONL file of {\"prompt\", \"answer\", \"type\"?} lines.")],
    model: ModelOption = None,
    methods: Annotated[str, typer.Option("--methods", help="all, or a comma-separated list of: log_prob_increase, "
                                         "log_probability, prob_increase, norm, coefficient, rank, "
                                         "coefficient_x_norm, coefficient_x_rank, random, integrated_gradients "
                                         "(slow; not in all).")] = "all",
    top: Annotated[Optional[int], typer.Option("--top", "-k", help="Neurons switched off per sentence. Default: "
                                               "10 (compare), 300 (value), 1000 (query), 1% of heads (heads).")]
    = None,
    protocol: Annotated[str, typer.Option("--protocol", help="compare (each method's top FFN neurons), value, "
                                          "query or heads.")] = "compare",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N facts.")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines and unusable facts: skip them "
                                          "(counted in the output) or stop.")] = "skip",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random controls.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sentences traced per forward pass.")] = 8,
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
    from .evaluation import PROTOCOLS, evaluate as run_evaluation, resolve_methods
    from .report import print_evaluation

    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if limit is not None and limit <= 0:
        raise UserError("--limit must be a positive number")
    if top is not None and top <= 0:
        raise UserError("--top must be a positive number")
    if batch_size <= 0:
        raise UserError("--batch-size must be a positive number")
    resolve_methods(methods)  # unknown names fail before the model loads
    _check_backend(backend, workers)
    _apply_memory_budget(max_memory)
    facts, skipped = load_facts(dataset, on_error)  # type: ignore[arg-type]
    facts = facts[:limit] if limit else facts
    loaded = _load(model, allow_pickle, dtype, device)
    with _backend(backend, loaded, model, dtype, workers, address, allow_pickle) as pool, \
            _progress_bar() as progress:
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
    from .report import print_datasets

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
    on_error: Annotated[str, typer.Option("--on-error", help="Malformed lines: skip them or stop.")] = "skip",
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
    from .runs import RunArguments, run_dataset

    for name, number in (("--limit", limit), ("--batch-size", batch_size), ("--top", top)):
        if number is not None and number <= 0:
            raise UserError(f"{name} must be a positive number")
    load_facts(dataset, on_error)  # type: ignore[arg-type]  # a bad dataset fails before the model loads
    _check_backend(backend, workers)
    _apply_memory_budget(max_memory)
    loaded = _load(model, allow_pickle, dtype, device)
    with _backend(backend, loaded, model, dtype, workers, address, allow_pickle) as pool, \
            _progress_bar() as progress:
        summary = run_dataset(loaded, out, RunArguments(dataset, limit, top, on_error), batch_size=batch_size,
                              progress=progress, model_argument=_model_argument(model), backend=pool)
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
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Reproduce the paper's analyses on a run: layer scores, histograms, head overlap, sharing, interventions."""
    from .analysis import analyze_run
    from .html_report import write_report

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    target = out or directory / "analysis"
    with _progress_bar() as progress:
        analysis = analyze_run(directory, interventions=interventions, per_type=per_type, progress=progress,
                               load=lambda name, dtype: _load(name, allow_pickle, dtype))
        report = write_report(analysis, target)
    console.print(f"Report: {escape(str(report))}")


_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_size(text: str) -> int:
    """'2GB', '500 MB', '1.5gb', '1048576' -> bytes (binary units)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--max-memory {text!r}: use a size such as 2GB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2) if match.group(2) in _UNITS else match.group(2) + "B"])


def _apply_memory_budget(text: str) -> None:
    from .scoring.value import set_memory_budget

    set_memory_budget(parse_size(text))


def _check_backend(name: str, workers: int) -> None:
    """Backend flags fail before the model loads."""
    if name not in ("local", "ray"):
        raise UserError(f"unknown backend {name!r}; use local or ray")
    if workers <= 0:
        raise UserError("--workers must be a positive number")
    if name == "ray":
        from .distributed import _ray

        _ray()


@contextmanager
def _backend(name: str, loaded, model: str | None, dtype: str | None, workers: int, address: str | None,
             allow_pickle: bool):
    """The backend a command's batches run on: here, or Ray workers (stopped on leaving). The name was
    checked by `_check_backend` before the model loaded."""
    from .execution import LocalBackend

    if name == "local":
        yield LocalBackend(loaded)
        return
    from .distributed import RayBackend

    with console.status(f"Starting {workers} Ray workers...", spinner="dots"):
        pool = RayBackend(_model_argument(model), dtype=dtype, workers=workers, address=address,
                          allow_pickle=allow_pickle)
    with pool:
        yield pool


def _model_argument(model: str | None) -> str | None:
    """How `analyze` will name the model again: a local path made absolute, anything else as given."""
    if model is not None and Path(model).exists():
        return str(Path(model).resolve())
    return model


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

    from .analysis import analyze_run
    from .attribution import attribute as run_attribution
    from .describe import describe_model
    from .html_report import write_report
    from .report import print_attribution, print_model_info
    from .runs import RunArguments, run_dataset

    if per_type <= 0:
        raise UserError("--per-type must be a positive number")
    started = time.perf_counter()
    loaded = _load(model)
    print_model_info(console, describe_model(loaded))
    for prompt, answer in (("The capital of France is", " Paris"), ("The largest planet is", " Jupiter")):
        print_attribution(console, run_attribution(loaded, prompt, answer, top_k=100), rows=5)
    console.rule(f"{per_type} sentences of each knowledge type: run and analyse")
    with _progress_bar() as progress:
        summary = run_dataset(loaded, out, RunArguments("knowledge", per_type, 300, "skip"), progress=progress,
                              model_argument=_model_argument(model))
        analysis = analyze_run(out, per_type=per_type, progress=progress, load=lambda *_: loaded)
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
