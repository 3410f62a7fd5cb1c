"""Commands about one prompt or one model: info, predict, attribute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import UserError
from .common import (AllowPickleOption, DeviceOption, DtypeOption, MaxMemoryOption, ModelOption, QueryTopOption, app,
                     console, load_model_spec, parse_neurons, settings_from_flags)


@app.command()
def info(model: ModelOption = None, json_file: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the description as JSON to this file.")] = None,
        allow_pickle: AllowPickleOption = False) -> None:
    """Describe a model: family, sizes, neuron counts and where the weights came from."""
    from ..files import write_json
    from ..model.describe import describe_model
    from ..reports.terminal import print_model_info

    loaded = load_model_spec(settings_from_flags(model, allow_pickle=allow_pickle).model)
    description = describe_model(loaded)
    print_model_info(console, description)
    if json_file:
        write_json(json_file, description)


@app.command()
def predict(prompt: Annotated[str, typer.Argument(help="The prompt whose next token is predicted.")],
            model: ModelOption = None, top: Annotated[int, typer.Option("--top", help="How many tokens.")] = 10,
            allow_pickle: AllowPickleOption = False) -> None:
    """Show the model's top next-token predictions for a prompt."""
    from ..pipelines.predict import predict_next
    from ..reports.terminal import print_predictions

    if top <= 0:
        raise UserError("--top must be a positive number")
    loaded = load_model_spec(settings_from_flags(model, allow_pickle=allow_pickle).model)
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
    neurons: Annotated[Optional[str], typer.Option("--neurons", help="Score only these neurons, exactly and fast, "
                                                   "e.g. 24_177,23_4_38@3,21.19 (FFN layer_neuron, attention "
                                                   "layer_head_dim@position, head layer.head).")] = None,
    max_memory: MaxMemoryOption = "2GB",
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Value neurons: which FFN and attention neurons raise the log probability of the answer."""
    from ..pipelines.attribute import attribute_with
    from ..reports.terminal import print_attribution

    if show <= 0:
        raise UserError("--show must be a positive number")
    settings = settings_from_flags(model, dtype=dtype, device=device, allow_pickle=allow_pickle, top=top,
                         query_top=query_top, max_memory=max_memory, reference=reference)
    chosen = parse_neurons(neurons) if neurons is not None else None
    loaded = load_model_spec(settings.model)
    if chosen is not None:
        from ..pipelines.score import score_neurons
        from ..reports.terminal import print_neuron_scores

        result = score_neurons(loaded, prompt, target, chosen, reference=reference,
                               memory_budget=settings.scoring.memory_budget)
        print_neuron_scores(console, result)
    else:
        with console.status("Attributing...", spinner="dots"):
            (result,) = attribute_with(loaded, [prompt], None if target is None else [target], settings.scoring)
        print_attribution(console, result, rows=show)
    if json_file:
        result.save(json_file)
        console.print(f"Wrote {escape(str(json_file))}")

