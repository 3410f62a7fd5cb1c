"""Starting the explorer: the listening socket (opened before the model loads, so a port in use is a one-line
error at once), the host names it answers to, and uvicorn serving the app on that socket."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import socket
import threading

from ..errors import UserError

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


def require_explorer() -> None:
    missing = [name for name in ("starlette", "uvicorn", "duckdb") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the explorer needs {', '.join(missing)}: pip install 'neuron-attribution[explorer]'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str] | None = None) -> list[str]:
    """Host header values to accept, in every mode (a hostile page can rebind its own name to any address):
    loopback names, the address served on, `extra` (`--allow-host`), and when serving on every interface the
    machine's own names and addresses."""
    names = [*LOOPBACK_NAMES, host, *(extra or [])]
    if host in ("0.0.0.0", "::", ""):
        names += machine_names()
    return [name for name in dict.fromkeys(names) if name not in ("0.0.0.0", "::", "")]


def machine_names() -> list[str]:
    """This machine's host name, fully qualified name and the addresses they resolve to (from the local
    resolver; nothing is asked of the network beyond it)."""
    hostname = socket.gethostname()
    names = [hostname, socket.getfqdn()]
    try:
        _, aliases, addresses = socket.gethostbyname_ex(hostname)
        names += aliases + addresses
    except OSError:
        pass
    try:
        names += [f"[{info[4][0]}]" if ":" in info[4][0] else info[4][0]
                  for info in socket.getaddrinfo(hostname, None)]
    except OSError:
        pass
    return [name for name in names if name]


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one."""
    try:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; choose another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    except (socket.gaierror, OverflowError) as error:
        raise UserError(f"cannot listen on {host}:{port}: {error}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def make_server(app, *, quiet: bool = True):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", lifespan="on",
                                         timeout_graceful_shutdown=2))


def serve_forever(app, sock: socket.socket) -> None:
    make_server(app).run(sockets=[sock])


class BackgroundServer:
    """The app served from a thread (tests, benchmarks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = open_socket(host, port)
        self.server = make_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the explorer's server did not start")
            self.thread.join(0.05)
        return url_of(self.sock)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
