"""The explorer on a shared machine (docs/design.md, README "The explorer"): against the real server (uvicorn on a
free loopback port), every request needs this server's Host, the launch's token and, for the API, the same
origin; bodies are read with a cap; model work waits in a bounded queue. Each refusal is checked to have the right
status and a one-line message, and to have run nothing. A tiny model: the guard does not depend on it."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("duckdb")

from neuron_attribution.explorer.app import create_app  # noqa: E402
from neuron_attribution.explorer.guard import cookie_name, host_name  # noqa: E402
from neuron_attribution.explorer.model_queue import ModelQueue  # noqa: E402
from neuron_attribution.explorer.run_index import RunIndex  # noqa: E402
from neuron_attribution.explorer.server import BackgroundServer, allowed_hosts  # noqa: E402
from neuron_attribution.explorer.views import Views  # noqa: E402
from neuron_attribution.settings import ScoringOptions  # noqa: E402

from .conftest import run_cli, tiny_llama  # noqa: E402

TOKEN = "a-test-token-of-some-length-0123456789"


class _CountingViews(Views):
    """The real views, with model work that is counted and takes a moment (so that requests pile up)."""

    def __init__(self, model):
        super().__init__(model, ScoringOptions())
        self.calls = 0
        self.delay = 0.0

    def neuron(self, index):
        self.calls += 1
        time.sleep(self.delay)
        return {"kind": "ffn", "name": str(index)}


@pytest.fixture(scope="module")
def guarded():
    views = _CountingViews(tiny_llama())
    queue = ModelQueue(max_pending=3)
    app = create_app(views, RunIndex([]), token=TOKEN, queue=queue)
    with BackgroundServer(app) as url:
        yield url, views, queue


def _request(url: str, path: str, *, method: str = "GET", headers: dict | None = None, body: bytes | None = None,
             host: str | None = None) -> tuple[int, dict, bytes]:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True)
        connection.putheader("Host", parts.netloc if host is None else host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _authorised(extra: dict | None = None) -> dict:
    return {"Cookie": f"{cookie_name(TOKEN)}={TOKEN}", **(extra or {})}


def _error(body: bytes) -> str:
    message = json.loads(body)["error"]
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_token_is_required_and_set_as_an_httponly_cookie(guarded):
    url, views, queue = guarded
    for path in ("/api/info", "/api/queue", "/api/neuron/0_1", "/api/search?q=x", "/api/runs/0"):
        for headers in ({}, {"Cookie": f"{cookie_name(TOKEN)}=wrong"}, {"Authorization": "token wrong"},
                        {"Cookie": f"{cookie_name('other')}={TOKEN}"}):
            status, _, body = _request(url, path, headers=headers)
            assert status == 403 and "carries the access token" in _error(body), (path, headers)
    status, _, body = _request(url, "/")
    assert status == 403 and b"access token" in body and b"<" not in body  # the shell: one line of text
    status, headers, _ = _request(url, "/neuron/0_1?token=wrong")
    assert status == 403
    status, headers, _ = _request(url, f"/neuron/0_1?token={TOKEN}&x=1")
    assert status == 303 and headers["location"] == "/neuron/0_1?x=1"  # the token leaves the address bar
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(TOKEN)}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert _request(url, "/", headers=_authorised())[0] == 200
    status, _, body = _request(url, "/api/info", headers=_authorised())
    assert status == 200 and json.loads(body)["model"]
    assert _request(url, "/api/info", headers={"Authorization": f"token {TOKEN}"})[0] == 200
    assert _request(url, "/favicon.ico")[0] == 204
    assert views.calls == 0 and queue.finished == 0


def test_a_foreign_host_is_refused_in_every_mode(guarded):
    url, views, _ = guarded
    for host in ("attacker.example", "attacker.example:80", "127.0.0.1.attacker.example", ""):
        status, _, body = _request(url, "/api/neuron/0_1", headers=_authorised(), host=host)
        assert status == 400 and "does not answer to the host" in _error(body), host
    assert views.calls == 0
    # Serving on every interface keeps a list: the machine's names, never "anything".
    everywhere = allowed_hosts("0.0.0.0", ["proxy.example"])
    assert "*" not in everywhere and "0.0.0.0" not in everywhere
    assert {"127.0.0.1", "localhost", "[::1]", "proxy.example"} <= set(everywhere)
    assert host_name("[::1]:8000") == "[::1]" and host_name("Example.ORG:80") == "example.org"


def test_cross_site_requests_run_no_model_work(guarded):
    """Another site's page holds the cookie in the user's browser: its `<img src=/api/neuron/…>` or `fetch` says
    where it comes from, and is refused before anything runs."""
    url, views, queue = guarded
    port = urllib.parse.urlsplit(url).port
    body = json.dumps({"prompt": "x", "neurons": ["0_1"], "scale": 0}).encode()
    for headers in ({"Origin": "http://attacker.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": f"http://127.0.0.1:{port + 1}"}, {"Origin": "null"}):
        status, _, answer = _request(url, "/api/neuron/0_1", headers=_authorised(headers))
        assert status == 403 and "cross-site requests are refused" in _error(answer), headers
        status, _, answer = _request(url, "/api/intervene", method="POST", body=body,
                                     headers=_authorised({**headers, "Content-Type": "application/json"}))
        assert status == 403, headers
    assert views.calls == 0 and queue.finished == 0
    same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, _, answer = _request(url, "/api/neuron/0_1", headers=_authorised(same))
    assert status == 200 and json.loads(answer)["name"] == "0_1" and views.calls == 1


def test_an_oversized_chunked_body_is_refused_while_it_streams(guarded):
    """A chunked body declares no length: it is read with a cap and refused past 64 KB, never buffered whole
    (a 400 MB body once took +805 MB). Here 32 MB are offered; the server (in this process) allocates under 8 MB
    at its peak meanwhile."""
    import tracemalloc

    url, views, _ = guarded
    before = views.calls
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.putrequest("POST", "/api/intervene")
    for name, value in _authorised({"Content-Type": "application/json", "Transfer-Encoding": "chunked"}).items():
        connection.putheader(name, value)
    connection.endheaders()
    chunk = b"x" * 65536
    sent = 0
    tracemalloc.start()
    try:
        for _ in range(512):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    assert response.status == 413 and "over 64 KB" in _error(response.read())
    connection.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    assert views.calls == before


def test_a_flood_past_the_queue_bound_is_refused_with_429(guarded):
    url, views, queue = guarded
    views.delay, before = 0.3, views.calls
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: _request(url, f"/api/neuron/0_{i}", headers=_authorised()), range(12)))
    finally:
        views.delay = 0.0
    statuses = [status for status, _, _ in answers]
    refused = [body for status, _, body in answers if status == 429]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses
    assert all("the model is busy" in _error(body) for body in refused)
    assert views.calls - before == statuses.count(200)  # nothing refused ran
    status, _, body = _request(url, "/api/queue", headers=_authorised())
    assert json.loads(body)["refused"] >= len(refused) and json.loads(body)["max_pending"] == 3


def test_serve_checks_its_token_options(monkeypatch, capsys):
    for args, message in ((["--token", "short"], "at least 16 characters"),
                          (["--token", TOKEN, "--insecure-no-token"], "not both")):
        code, _, err = run_cli(monkeypatch, capsys, "serve", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_page_opens_with_the_printed_url_in_a_browser(guarded):
    """Chromium opens the URL with the token once; the cookie carries it to the page's own API calls."""
    from .test_explorer import _driver, _wait_for

    url, _, _ = guarded
    driver = _driver()
    try:
        driver.get(url + "run/0")
        assert "access token" in driver.find_element("tag name", "body").text
        driver.get(url + f"?token={TOKEN}")
        _wait_for(driver, lambda d: "token" not in d.current_url)
        cookies = {c["name"]: c for c in driver.get_cookies()}
        assert cookies[cookie_name(TOKEN)]["httpOnly"] and cookies[cookie_name(TOKEN)]["sameSite"] == "Strict"
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly: not readable by scripts
        status = driver.execute_async_script(
            "const done = arguments[0]; fetch('/api/info').then(r => done(r.status))")
        assert status == 200
    finally:
        driver.quit()


def test_the_server_answers_while_refusing(guarded):
    """Refusals do not block the event loop: 40 refused and 10 accepted requests from 10 threads all answered."""
    url, _, _ = guarded
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        headers = _authorised() if i % 5 == 0 else {}
        status = _request(url, "/api/queue", headers=headers)[0]
        with lock:
            results.append(status)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(50)))
    assert results.count(200) == 10 and results.count(403) == 40
