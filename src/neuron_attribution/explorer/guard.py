"""Who may use the explorer. `serve` runs where other people log in too (a shared GPU or login node), and every
user of such a machine can reach its loopback; a web page in anyone's browser can send requests there. So every
request passes, in this order:

1. **Host**: its Host header names this server (loopback names, the address served on, the machine's own names
   and addresses when serving on every interface, and `--allow-host`), in every mode: a hostile page that rebinds
   its DNS name to this address is refused (DNS rebinding).
2. **Token** (as Jupyter does): a random token per launch, printed in the URL. Opening that URL once sets it as an
   HttpOnly, SameSite=Strict cookie and redirects to the same page without it; every later request carries the
   cookie (scripts may send `Authorization: token …` instead). Without it, nothing but the icon is served.
3. **Same origin** for the API: a request that says it comes from another site (`Sec-Fetch-Site: cross-site` or
   `same-site`, or an `Origin` that is not this server) is refused, so another page's `<img>` or `fetch` cannot
   make the model work, even in a browser that holds the cookie.

Refusals are one-line JSON errors (the page shell: one line of text), and nothing behind them runs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

TOKEN_PARAMETER = "token"
PUBLIC_PATHS = frozenset({"/favicon.ico"})


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(token: str) -> str:
    """One cookie per token: explorers on other ports of the same host keep theirs (cookies ignore ports)."""
    return "neuron-attribution-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def host_name(header: str) -> str:
    """The host part of a Host header or of an origin's authority: `[::1]:8000` → `[::1]`, `a.b:80` → `a.b`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Pure ASGI middleware applying the three checks above. `token` None switches the token off (the CLI's
    loudly named `--insecure-no-token`); the Host and origin checks stay."""

    def __init__(self, app, *, hosts: Iterable[str], token: str | None):
        self.app = app
        self.hosts = frozenset(host_name(h) for h in hosts)
        self.token = token
        self.cookie = cookie_name(token) if token is not None else ""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        host = host_name(headers.get("host", ""))
        if host not in self.hosts:
            await _refuse(send, 400, f"this server does not answer to the host {host!r}", path)
            return
        if path.startswith("/api/") and not _same_origin(headers, host):
            await _refuse(send, 403, "cross-site requests are refused; use the explorer's own page", path)
            return
        if self.token is None or path in PUBLIC_PATHS or self._has_token(headers):
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        offered = query.get(TOKEN_PARAMETER)
        if offered is not None and secrets.compare_digest(offered.encode(), self.token.encode()):
            await self._set_cookie_and_redirect(send, path, query)
            return
        await _refuse(send, 403, "open the URL that `neuron-attribution serve` printed: it carries the access "
                                 "token", path)

    def _has_token(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        expected = self.token.encode()
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() in ("token", "bearer") and secrets.compare_digest(value.strip().encode(), expected):
            return True
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header holds no token
            return False
        held = cookies.get(self.cookie)
        return held is not None and secrets.compare_digest(held.value.encode(), expected)

    async def _set_cookie_and_redirect(self, send, path: str, query: dict[str, str]) -> None:
        rest = {k: v for k, v in query.items() if k != TOKEN_PARAMETER}
        location = path + ("?" + urlencode(rest) if rest else "")
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1")),
                                (b"content-length", b"0"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})


def _same_origin(headers: dict[str, str], host: str) -> bool:
    """False for a request a browser marks as coming from another site. Tools that send neither header (curl,
    scripts with the token) pass."""
    if headers.get("sec-fetch-site", "same-origin").lower() not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    scheme, _, authority = origin.partition("://")
    return scheme in ("http", "https") and authority.lower() == headers.get("host", "").strip().lower() \
        and host_name(authority) == host


async def _refuse(send, status: int, message: str, path: str) -> None:
    if path.startswith("/api/"):
        body, media = json.dumps({"error": message}).encode(), b"application/json"
    else:
        body, media = (message + "\n").encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
