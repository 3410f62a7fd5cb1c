"""Command-line interface: thin wrappers over the library, one subcommand per task. Each command builds its
`Settings` once from its flags and hands them to everything it runs (backends, workers, run.json)."""

from __future__ import annotations

import gc
import sys

from rich.console import Console
from rich.markup import escape

from ..errors import UserError
from . import datasets, single  # noqa: F401  (importing them defines and so registers the commands)
from .common import app, defer_collection


def main() -> None:
    defer_collection()
    try:
        app()
    except UserError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)
    finally:
        gc.freeze()  # interpreter shutdown then skips scanning torch's and transformers' objects (~0.5 s)
