"""`nova serve --http-workers N`: N HTTP worker processes in front of one model process.

One event loop parses every request's JSON, tokenizes its items and encodes its response; behind a fast GPU
that host work, not the forward, is what limits a server answering short requests. With N workers, each is
the usual server app (the same routes, auth, limits and metrics), serving the same listening sockets (the
kernel hands each connection to one of them) and attached to the one model process over pipes of its own.
The model process runs the batches that wait from every worker as one forward (engine/child.py,
`ForwardMerger`), so the GPU still sees batches near the budget; adapters loaded or unloaded through any worker
reach all of them; the concurrency and queue limits count every worker's requests (admission.py, `Tally`);
`/metrics` adds up every worker's counts (metrics.py).

This process, the supervisor, binds the sockets, starts the model process and then the workers, and passes
SIGINT/SIGTERM on to the workers (each drains its requests as a single server would); when they are gone, the
model process ends with its pipes. If the model fails to load or any process dies, the whole server stops,
with one error line.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile

from .admission import SharedLimits
from .config import Settings
from .engine import EngineLink, spawn_engine

log = logging.getLogger("serve")


def run_http_workers(settings: Settings, sockets: list[socket.socket], wrap_model=None) -> int:
    """Serve on `sockets` with `settings.http_workers` workers until stopped; the exit status (0: stopped by a
    signal, every worker cleanly). `wrap_model` (picklable) wraps the model in the model process."""
    context = multiprocessing.get_context("spawn")
    metrics_dir = tempfile.mkdtemp(prefix="nova-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the workers, spawned, read it before any metric exists
    stopping = False
    workers: list = []

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = None
    try:
        engine, links = spawn_engine(settings, settings.http_workers, wrap_model)
        limits = SharedLimits.create(context)
        for index, link in enumerate(links):
            worker = context.Process(target=worker_main, args=(settings, sockets, link, limits, index),
                                     name=f"nova-http-{index}")
            worker.start()
            workers.append(worker)
        for link in links:
            link.close()  # the workers hold their ends; the model process sees a worker's exit as end of file
        if stopping:  # a signal came while they started: those started after it have not seen it
            stop(None, None)
        log.info("%d HTTP workers (pids %s) in front of the model process (pid %d)", len(workers),
                 ", ".join(str(w.pid) for w in workers), engine.pid)
        return _supervise(workers, lambda: stopping, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:
            worker.join(timeout=settings.graceful_shutdown_timeout + 10)
            if worker.is_alive():
                worker.kill()
        if engine is not None:
            engine.join(timeout=30)
            if engine.is_alive():
                engine.kill()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


# uvicorn ends a server stopped by a signal by raising that signal again once it has drained
STOPPED_CLEANLY = (0, -signal.SIGTERM, -signal.SIGINT)


def _supervise(workers: list, stopping, stop) -> int:
    """Wait for the workers; the first to exit unasked stops the others. -> the server's exit status."""
    status = 0
    alive = list(workers)
    while alive:
        ended = multiprocessing.connection.wait([w.sentinel for w in alive])
        for worker in [w for w in alive if w.sentinel in ended]:
            worker.join()
            alive.remove(worker)
            if worker.exitcode not in STOPPED_CLEANLY:
                status = 1
            if not stopping():
                if worker.exitcode == 0:  # a worker never stops by itself: count it as a failure
                    status = 1
                log.debug("HTTP worker %s exited (code %s); stopping the others", worker.name, worker.exitcode)
                stop(None, None)
    return status


def worker_main(settings: Settings, sockets: list[socket.socket], link: EngineLink, limits: SharedLimits,
                index: int) -> None:
    """One HTTP worker: the server app attached to the model process through `link`. Worker 0 prints the line
    the server ends with when it fails (every worker sees the same failure)."""
    from .app import create_app
    from .listening import one_line, serve_app
    from .logs import setup_logging

    setup_logging(settings.log_level)
    app = create_app(settings, engine_link=link, shared_limits=limits)
    failure = serve_app(app, settings, sockets)
    if failure is not None:
        if index == 0:
            print(f"nova serve: error: {one_line(failure)}", file=sys.stderr)
        sys.exit(1)
