"""Command-line interface: thin wrappers over the library, one subcommand per task. Each command builds its
`Settings` once from its flags and hands them to everything it runs (backends, workers, run.json)."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.markup import escape

from ..errors import UserError, for_the_command_line
from . import datasets, explorer, single  # noqa: F401  (importing them defines and so registers the commands)
from .common import app, collection_deferred


# Loggers of optional libraries whose import-time warnings concern kernels and torch internals no command here
# uses: torchao (transformers imports it at every model load wherever it is installed) and bitsandbytes' CPU
# backend (a missing package for the fused CPU kernel that 4-bit layers are kept off, model/quantization).
_IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


def quiet_import_chatter() -> None:
    for name in _IMPORT_CHATTER:
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    quiet_import_chatter()
    with collection_deferred():
        try:
            app()
        except UserError as error:
            Console(stderr=True).print(f"[bold red]error:[/] {escape(for_the_command_line(str(error)))}", highlight=False,
                                       soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            Console(stderr=True).print("interrupted")
            sys.exit(130)
