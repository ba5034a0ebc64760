"""Listening and serving: the sockets `nova serve` binds before anything else starts, uvicorn run on them (one
server process, or each of `--http-workers` processes), and the one line the server ends with when it fails."""

from __future__ import annotations

import errno
import socket

from .config import Settings

LISTEN_BACKLOG = 2048  # uvicorn's default


def bind_listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as uvicorn's own `create_server` would bind them.
    Bound here, before the app starts (and before a model process is spawned), so that a port that cannot be
    bound ends `nova serve` at once, and "listening" is only ever logged for a socket that is."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)  # listening holds the port (two bound, unlistened sockets may share it)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one line `nova serve` ends with when it cannot listen."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the address is already in use (another server?); choose another --port"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); choose another --port"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: --host {host!r} is not an address of this machine ({exc.strerror or exc})"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def one_line(message: str) -> str:
    """A message as one line (a library's, e.g. transformers', may span several): the process's last line."""
    return " ".join(str(message).split())


def serve_app(app, settings: Settings, sockets: list[socket.socket]) -> str | None:
    """Run uvicorn with `app` on the bound `sockets` until it stops. -> why the server failed (the model did
    not load, its process died), or None when it was stopped."""
    import uvicorn

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout, lifespan="on",
        log_level=settings.log_level, backlog=LISTEN_BACKLOG,
    )
    server = uvicorn.Server(config)
    failed: list[str] = []

    def on_load_failed(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app.state.nova.on_load_failed = on_load_failed
    server.run(sockets=sockets)
    return failed[0] if failed else None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
