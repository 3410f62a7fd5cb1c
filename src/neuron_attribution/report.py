"""Terminal reports (rich). Only presentation: everything shown is computed elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .prediction import Prediction

_INFO_LABELS = [("family", "Family"), ("architecture", "Architecture"), ("layers", "Layers"),
                ("heads", "Attention heads"), ("kv_heads", "KV heads"), ("head_dim", "Head size"),
                ("hidden_size", "Hidden size"), ("ffn_neurons_per_layer", "FFN neurons per layer"),
                ("ffn_kind", "FFN type"), ("norm", "Norm"), ("vocab_size", "Vocabulary"),
                ("max_positions", "Context length"), ("attention_neurons_per_token", "Attention neurons per token"),
                ("dtype", "Weights dtype"), ("device", "Device"), ("source", "Weights from")]


def print_model_info(console: Console, description: dict[str, Any]) -> None:
    table = Table(title=f"Model: {description['name']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, label in _INFO_LABELS:
        table.add_row(label, Text(str(description[key])))
    console.print(table)


def print_predictions(console: Console, prompt: str, predictions: list[Prediction]) -> None:
    console.print(Text(f"Next token after {prompt!r}", style="bold"))
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("prob", justify="right")
    for rank, p in enumerate(predictions, 1):
        table.add_row(str(rank), Text(repr(p.token)), str(p.id), f"{p.prob:.2%}")
    console.print(table)
