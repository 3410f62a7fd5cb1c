"""`serve`: the explorer, a local web app over one model and any finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from ..settings import DEFAULT_MAX_MEMORY, DEFAULT_QUERY_TOP, DEFAULT_QUERY_VIA
from .common import (QueryViaOption, AllowPickleOption, DeviceOption, DtypeOption, MaxMemoryOption, ModelOption, QueryTopOption,
                     app, console, load_model_spec, settings_from_flags,
                     QuantizationOption)


@app.command()
def serve(model: ModelOption = None,
          run: Annotated[Optional[list[Path]], typer.Option("--run", help="A finished run directory to explore "
                                                            "(repeatable): neuron pages across its sentences, its "
                                                            "run view.")] = None,
          host: Annotated[str, typer.Option("--host", help="Address to listen on. Other than loopback, anyone who "
                                            "can reach it can use the model.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 8000,
          token: Annotated[Optional[str], typer.Option("--token", help="The access token the URL carries (default: "
                                                       "a new random one each launch).")] = None,
          insecure_no_token: Annotated[bool, typer.Option("--insecure-no-token", help="Serve without a token: "
                                                          "anyone who can reach the port (every user of this "
                                                          "machine, on loopback) can run the model and read the "
                                                          "runs.")] = False,
          allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="Another name this server "
                                                                  "answers to in the Host header (repeatable), "
                                                                  "e.g. behind a proxy.")] = None,
          query_top: QueryTopOption = DEFAULT_QUERY_TOP,
          query_via: QueryViaOption = DEFAULT_QUERY_VIA,
          max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
          dtype: DtypeOption = None,
          device: DeviceOption = None,
          allow_pickle: AllowPickleOption = False, quantization: QuantizationOption = None) -> None:
    """The explorer: attribution graphs you can click, switch off and amplify neurons from the page, neuron
    pages across runs. Serves until Ctrl+C, to whoever opens the printed URL (it carries an access token)."""
    from ..errors import UserError
    from ..explorer.guard import TOKEN_PARAMETER, new_token
    from ..explorer.server import allowed_hosts, is_loopback, open_socket, require_explorer, serve_forever, url_of

    require_explorer()
    from ..explorer.run_index import RunIndex, check_runs, check_shape

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is 0 to 65535")
    if token is not None and insecure_no_token:
        raise UserError("give --token or --insecure-no-token, not both")
    if token is not None and len(token) < 16:
        raise UserError("--token must be at least 16 characters (a guessable token guards nothing)")
    access = None if insecure_no_token else token or new_token()
    settings = settings_from_flags(model, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                   quantization=quantization,
                                   query_top=query_top, max_memory=max_memory, query_via=query_via)
    runs = check_runs(run or [])
    sock = open_socket(host, port)
    if access is None:
        console.print(Text("Warning: --insecure-no-token: anyone who can reach this port — every user of this "
                           "machine, even on loopback — can run the model and read the loaded runs.",
                           style="bold red"))
    elif not is_loopback(host):
        console.print(Text(f"Warning: serving on {host}, not loopback: the token is all that stands between the "
                           "network and the model, and it travels unencrypted. Prefer loopback and an SSH tunnel.",
                           style="bold yellow"))
    loaded = load_model_spec(settings.model)
    check_shape(runs, loaded.shape.to_dict())
    from ..explorer.app import create_app
    from ..explorer.views import Views

    with console.status("Indexing runs...", spinner="dots"):
        index = RunIndex(runs)
    application = create_app(Views(loaded, settings.scoring), index, token=access,
                             allowed_hosts=allowed_hosts(host, allow_host))
    loaded_runs = "".join(f"\n  run {r.index}: {escape(str(r.path))} ({r.record.get('sentences')} sentences)"
                          for r in runs)
    address = url_of(sock) + ("" if access is None else f"?{TOKEN_PARAMETER}={access}")
    console.print(f"Explorer for {escape(loaded.name)} at {address}{loaded_runs}\n(Ctrl+C stops it)",
                  highlight=False, soft_wrap=True)
    serve_forever(application, sock)
