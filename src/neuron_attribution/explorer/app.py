"""The explorer's HTTP routes (Starlette): one page shell whose script draws every view, static assets from the
package, and a JSON API. Model work goes through the `ModelQueue`; run queries and the rest through the thread
pool, so the event loop always answers.

A user's mistake is a 4xx with a one-line `{"error": ...}`, never a traceback. The browser names runs by number
and assets by a fixed name: no request can reach a file outside the loaded runs and the package's assets.
Every request passes `guard.Guard` (Host allow-list, the launch's token, same-origin API); bodies are JSON sent as
application/json (a form on another site cannot) and read with a cap; model work waits in a bounded queue.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import UserError, for_a_page
from ..model.prompts import encode_prompt
from ..neurons import parse_neuron
from .guard import Guard
from .model_queue import ModelQueue, QueueFull
from .run_index import RunIndex
from .server import LOOPBACK_NAMES
from .views import PromptQuery, Views, neuron_list, scale_of

MAX_BODY = 64 * 1024
log = logging.getLogger("neuron_attribution.explorer")

# name in /assets/ -> (package, file, media type); nothing else is served
ASSETS = {
    "explorer.js": ("neuron_attribution.explorer", "assets/explorer.js", "text/javascript"),
    "explorer.css": ("neuron_attribution.explorer", "assets/explorer.css", "text/css"),
    "graph.js": ("neuron_attribution.reports", "assets/graph.js", "text/javascript"),
    "circuit.js": ("neuron_attribution.reports", "assets/circuit.js", "text/javascript"),
    "cytoscape.min.js": ("neuron_attribution.reports", "vendor/cytoscape-3.35.0.min.js", "text/javascript"),
}
SECURITY_HEADERS = [
    # Cytoscape.js sets inline styles; scripts come only from this server.
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _asset(name: str) -> bytes:
    package, path, _ = ASSETS[name]
    return resources.files(package).joinpath(path).read_bytes()


class _SecurityHeaders:
    """Pure ASGI middleware adding the headers above to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)
        await self.app(scope, receive, with_headers)


# the prompt view's controls, by the option each sets: errors name them as the page does
PAGE_CONTROLS = {"answer_tokens": "Answer tokens", "query_via": "Query neurons via", "target": "Answer",
                 "contrast": "rather than"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the request body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HTTPException(413, f"the request body is over {MAX_BODY // 1024} KB")
    chunks, size = [], 0
    async for chunk in request.stream():  # read with a cap: a chunked body declares no length
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPException(413, f"the request body is over {MAX_BODY // 1024} KB")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, "the request body is not valid JSON") from None


def create_app(views: Views, runs: RunIndex, *, token: str | None, allowed_hosts: list[str] | None = None,
               queue: ModelQueue | None = None) -> Starlette:
    """The ASGI app over a loaded model (`views`) and indexed runs. `token`: the access token every request must
    carry (`guard.new_token()`; None switches it off and must be chosen explicitly). `allowed_hosts`: Host header
    values accepted (default: loopback names)."""
    queue = queue or ModelQueue()
    model = views.model
    page = _asset_text("neuron_attribution.explorer", "assets/index.html")

    async def shell(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise HTTPException(404, f"no asset {name!r}")
        return Response(_asset(name), media_type=ASSETS[name][2] + "; charset=utf-8",
                        headers={"cache-control": "no-cache"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    async def info(request: Request) -> Response:
        return JSONResponse({"model": model.name, "shape": model.shape.to_dict(),
                             "runs": [run.summary() for run in runs.runs], "queue": queue.status()})

    async def queue_status(request: Request) -> Response:
        return JSONResponse(queue.status())

    async def attribute(request: Request) -> Response:
        query = PromptQuery.of(await _json_body(request))
        await run_in_threadpool(views.check_target, query)  # a bad prompt or target fails before it waits
        started = time.perf_counter()
        view = await queue.run(f"attributing {query.prompt!r}", lambda: views.prompt_view(query))
        return JSONResponse({**view, "seconds": time.perf_counter() - started})

    async def intervene(request: Request) -> Response:
        body = await _json_body(request)
        query = PromptQuery.of(body)
        neurons, scale = neuron_list(body.get("neurons")), scale_of(body.get("scale", 0))
        for index in neurons:
            model.shape.check(index)
        await run_in_threadpool(encode_prompt, model, query.prompt)
        started = time.perf_counter()
        result = await queue.run(f"intervening on {len(neurons)} neurons",
                                 lambda: views.intervene(query, neurons, scale))
        return JSONResponse({**result, "seconds": time.perf_counter() - started})

    async def measure(request: Request) -> Response:
        body = await _json_body(request)
        query = PromptQuery.of(body)
        neurons = neuron_list(body.get("neurons"))
        for index in neurons:
            model.shape.check(index)
        await run_in_threadpool(encode_prompt, model, query.prompt)
        started = time.perf_counter()
        result = await queue.run(f"measuring {len(neurons)} neurons one by one", lambda: views.measure(query, neurons))
        return JSONResponse({**result, "seconds": time.perf_counter() - started})

    async def neuron(request: Request) -> Response:
        index = parse_neuron(request.path_params["name"])
        try:
            model.shape.check(index)
        except UserError as error:
            raise HTTPException(404, str(error)) from None
        weights = await queue.run(f"projecting {index}", lambda: views.neuron(index))
        across = await run_in_threadpool(runs.neuron_view, index)
        return JSONResponse({**weights, "runs": across})

    async def search(request: Request) -> Response:
        text = request.query_params.get("q", "")
        if len(text) > 200:
            raise UserError("search for one token or one neuron")
        try:
            index = parse_neuron(text)
        except UserError:
            index = None
        if index is not None:
            model.shape.check(index)
            return JSONResponse({"neuron": str(index)})
        token_id = views.token_id(text)
        found = await queue.run(f"searching {text!r}", lambda: views.promoting(token_id))
        return JSONResponse({**found, "other_variant": views.other_variant(text),
                             "runs": await run_in_threadpool(runs.promoting, found["token"])})

    async def run_view(request: Request) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(runs.run_view, request.path_params["run"]))
        except LookupError as error:
            raise HTTPException(404, str(error)) from None

    async def user_error(request: Request, error: Exception) -> Response:
        return _error(400, for_a_page(str(error), PAGE_CONTROLS))

    async def queue_full(request: Request, error: Exception) -> Response:
        return _error(429, str(error))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return _error(error.status_code, str(error.detail))

    async def server_error(request: Request, error: Exception) -> Response:
        log.exception("explorer: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); the server's log has the details")

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.close()

    routes = [Route("/", shell), Route("/neuron/{name}", shell), Route("/run/{run:int}", shell),
              Route("/search", shell), Route("/assets/{name}", asset), Route("/favicon.ico", no_icon),
              Route("/api/info", info), Route("/api/queue", queue_status),
              Route("/api/attribute", attribute, methods=["POST"]),
              Route("/api/intervene", intervene, methods=["POST"]),
              Route("/api/measure", measure, methods=["POST"]),
              Route("/api/neuron/{name}", neuron), Route("/api/search", search),
              Route("/api/runs/{run:int}", run_view)]
    hosts = allowed_hosts or LOOPBACK_NAMES
    app = Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders),
                                               Middleware(Guard, hosts=hosts, token=token)],
                    exception_handlers={UserError: user_error, QueueFull: queue_full, HTTPException: http_error,
                                        Exception: server_error},
                    lifespan=lifespan)
    app.state.queue = queue
    return app


def _asset_text(package: str, path: str) -> str:
    return resources.files(package).joinpath(path).read_text(encoding="utf-8")
