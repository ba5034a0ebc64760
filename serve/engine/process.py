"""`ProcessEngine`: the model in a process of its own (the default of `nova serve`), and `RemoteModel`, the
server process's view of it.

Why a process: a forward is hundreds of small torch operations and each one re-takes Python's GIL, while
the server process parses JSON, tokenizes and renders responses on other threads. In one process the model
thread queues behind them for the GIL (docs/server.md, "Where the model runs"), which is why vLLM V1 split its
API server and engine into two processes; TEI keeps its Python backend out of the router's process the same way.
The server process keeps the processor (tokenizing never leaves the HTTP side) and talks to the engine over
one pipe: rows go in as columns (`PackedRows`), a `BatchResult` (numpy vectors, or a row's exception) comes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import threading
from collections.abc import Awaitable
from dataclasses import dataclass

from ..rows import BatchResult, EmbeddingRow, PackedRows
from .child import Link, engine_main
from .framing import FrameReader

log = logging.getLogger("serve.engine")


class EngineExited(RuntimeError):
    """The model process is gone (crashed, killed, out of memory): the server cannot answer any more."""


class ModelLoadFailed(RuntimeError):
    """The model process could not load the model; the message is the original error, class name first."""


@dataclass
class EngineLink:
    """A server process's end of its `Link` to the model process: requests go down `requests`, replies and
    notices come up `replies`. Picklable, so that `nova serve --http-workers N` hands one to each worker."""

    requests: multiprocessing.connection.Connection
    replies: multiprocessing.connection.Connection

    def close(self) -> None:
        for connection in (self.requests, self.replies):
            connection.close()


def spawn_engine(settings, workers: int = 1, wrap_model=None) -> tuple[multiprocessing.process.BaseProcess,
                                                                        list[EngineLink]]:
    """Start the model process (spawned, so CUDA initializes there and only there) with one link per HTTP
    worker; it loads the model and answers "ready" (or "failed") on every link."""
    from transformers.dynamic_module_utils import init_hf_modules

    init_hf_modules()  # the processor arrives pickled; its class is the model's remote code, a dynamic module
    context = multiprocessing.get_context("spawn")
    child_links, links = [], []
    for _ in range(workers):
        requests_in, requests_out = context.Pipe(duplex=False)
        replies_in, replies_out = context.Pipe(duplex=False)
        child_links.append(Link(requests_in, replies_out))
        links.append(EngineLink(requests_out, replies_in))
    process = context.Process(target=engine_main, args=(child_links, settings, os.getpid(), wrap_model),
                              name="nova-engine", daemon=True)
    process.start()
    for link in child_links:
        link.requests.close()
        link.replies.close()
    return process, links


class EngineNotices:
    """What a server process does when the model process tells it something unasked (several HTTP workers):
    another worker loaded or unloaded an adapter, or wants to unload one and asks this worker to drain it."""

    def adapters_changed(self, adapters: dict[str, dict]) -> None:
        pass

    async def drain(self, name: str, timeout: float) -> bool:
        return True


class RemoteModel:
    """The server process's view of a model that lives in the engine process: the processor (tokenizing
    happens here), the config, and adapter calls forwarded to the engine. Routing reads the adapter names
    mirrored here, refreshed after every load or unload (this worker's, or, with several HTTP workers, any
    worker's: the engine sends every worker the new list)."""

    def __init__(self, engine: ProcessEngine, info: dict):
        self._engine = engine
        self.processor = info["processor"]
        self.config = self.processor.config
        self.max_loras = info["max_loras"]
        self.max_lora_rank = info["max_lora_rank"]
        self._adapters = info["adapters"]
        self.processor.adapter_names = lambda: set(self._adapters)

    def mirror(self, adapters: dict[str, dict]) -> None:
        """The resident adapters as the engine last reported them (another worker's change included)."""
        self._adapters = adapters

    def check_dimensions(self, dimensions, return_multivector=False) -> None:
        self.processor.check_dimensions(dimensions, return_multivector)

    def list_adapters(self) -> dict[str, dict]:
        return dict(self._adapters)

    def load_adapter(self, name, path) -> list[str]:
        try:
            return self._engine.call("load_adapter", name, path)
        finally:
            self.mirror(self._engine.call("list_adapters"))

    def unload_adapter(self, name) -> None:
        try:
            self._engine.call("unload_adapter", name)
        finally:
            self.mirror(self._engine.call("list_adapters"))


class ProcessEngine:
    """The runner in a child process (spawned, so CUDA initializes there and only there). Two one-way pipes:
    requests ("embed", id, PackedRows) and ("call", id, method, args) go down one (blocking writes, so a large image
    batch never meets a full non-blocking pipe), replies (id, ok, value, prefix-cache stats) come up the other
    as length-prefixed pickles, read without blocking on the event loop as they arrive.
    The child ignores SIGINT/SIGTERM: the server drains in-flight requests first and then closes the pipe,
    which ends the child; if the server dies, the closed pipe ends it too."""

    def __init__(self, settings, link: EngineLink | None = None):
        self.settings = settings
        self.model: RemoteModel | None = None
        self.process = None  # None when attached to a model process another process started (`link`)
        self._link = link
        self._conn = None  # requests, down
        self._replies = None  # replies, up (a Connection used only for its file descriptor)
        self._frames = FrameReader()
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._send_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-engine-send")
        self._stats: dict | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_exit = lambda message: None  # set by the server: the engine died under it
        self.notices = EngineNotices()  # set by the server

    # ---- life cycle

    async def start(self) -> RemoteModel:
        """Spawn the child and wait (in a worker thread) until its model is loaded; from then on its replies
        are read on the event loop as they arrive (no reader thread to hand them over)."""
        model = await asyncio.to_thread(self._spawn)
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._replies.fileno(), False)
        self._loop.add_reader(self._replies.fileno(), self._read_replies)
        return model

    def _spawn(self) -> RemoteModel:
        if self._link is None:
            with self._lock:  # stop() may run meanwhile (the server stopped while this thread starts the child)
                if self._stopping:
                    raise EngineExited("the server stopped before the model process started")
                self.process, (self._link,) = spawn_engine(self.settings)
        self._conn, self._replies = self._link.requests, self._link.replies
        message = None
        while message is None:
            chunk = os.read(self._replies.fileno(), 1 << 20)
            if not chunk:
                raise EngineExited(f"the model process exited while loading{self._exit_code()}")
            message = next(self._frames.feed(chunk), None)
        kind, payload = message
        if kind == "failed":
            if self.process is not None:
                self.process.join(timeout=10)
            raise ModelLoadFailed(payload)
        self._stats = payload.pop("prefix_cache")
        self.model = RemoteModel(self, payload)
        return self.model

    async def stop(self) -> None:
        """Close the pipe (the child finishes its batch and exits); a child still loading is killed."""
        with self._lock:  # after this, _spawn starts no child; one it started is self.process
            self._stopping = True
        if self._loop is not None and self._replies is not None:
            self._loop.remove_reader(self._replies.fileno())
        if self.model is None and self.process is not None and self.process.is_alive():
            self.process.kill()  # still loading: its reply pipe closes, which ends _spawn's wait
        elif self._conn is not None:
            with self._lock:
                try:
                    self._conn.send(("stop",))
                except OSError:
                    pass
        self._send_thread.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            await asyncio.to_thread(self.process.join, 30)
            if self.process.is_alive():
                self.process.kill()
        if self._link is not None:
            self._link.close()
        self._fail_pending(EngineExited("the server is shutting down"))

    # ---- requests

    def _send(self, message: tuple, future) -> None:
        """Send one request (raises EngineExited if it cannot); its reply resolves `future` (an asyncio future
        for embeddings, a concurrent one for calls from worker threads)."""
        request_id = next(self._ids)
        self._pending[request_id] = future
        try:
            with self._lock:
                if self._stopping or self._conn is None:
                    raise EngineExited("the model process is not running")
                self._conn.send((message[0], request_id, *message[1:]))
        except Exception as exc:
            self._pending.pop(request_id, None)
            if isinstance(exc, EngineExited):
                raise
            raise EngineExited(f"the model process is unreachable: {exc}") from exc

    async def embed(self, rows: list[EmbeddingRow]) -> BatchResult:
        """The rows go as columns (`PackedRows`). Text rows are packed, pickled and sent from the event loop (a
        few kilobytes); batches with images from a worker thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if any(row.carries_image for row in rows):
            await loop.run_in_executor(self._send_thread, self._send_rows, rows, future)
        else:
            self._send_rows(rows, future)
        return await future

    def _send_rows(self, rows: list[EmbeddingRow], future) -> None:
        self._send(("embed", PackedRows.of(rows, self.model.processor)), future)

    def call(self, method: str, *args):
        """A model method in the engine (adapter load/unload/list); blocking, from a worker thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", method, args), future)
        return future.result()

    def prefix_cache_stats(self) -> dict:
        """As of the last batch (every reply carries them): /metrics never waits for a forward."""
        return dict(self._stats or {})

    def _read_replies(self) -> None:
        """Event loop, when the reply pipe is readable: read what has arrived, resolve every whole reply."""
        while True:
            try:
                chunk = os.read(self._replies.fileno(), 1 << 20)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._exited()
                return
            for message in self._frames.feed(chunk):
                if isinstance(message[0], str):
                    self._notice(message)
                    continue
                request_id, ok, value, stats = message
                if stats is not None:
                    self._stats = stats
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _notice(self, message: tuple) -> None:
        """Event loop: a message the engine sent unasked (several HTTP workers share it)."""
        if message[0] == "adapters":
            if self.model is not None:
                self.model.mirror(message[1])
            self.notices.adapters_changed(message[1])
        elif message[0] == "drain":
            _, drain_id, name, timeout = message
            self._answer_drain(drain_id, self.notices.drain(name, timeout))

    def _answer_drain(self, drain_id: int, drained: Awaitable[bool]) -> None:
        async def answer() -> None:
            try:
                ok = await drained
            except Exception:  # noqa: BLE001 - the engine keeps the adapter
                log.exception("draining an adapter for another worker failed")
                ok = False
            try:
                self._send_now(("drained", drain_id, ok))
            except EngineExited:
                pass

        task = self._loop.create_task(answer())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_now(self, message: tuple) -> None:
        with self._lock:
            if self._stopping or self._conn is None:
                raise EngineExited("the model process is not running")
            self._conn.send(message)

    def _exit_code(self) -> str:
        if self.process is None:
            return ""
        self.process.join(timeout=5)
        return f" (exit code {self.process.exitcode})"

    def _exited(self) -> None:
        self._loop.remove_reader(self._replies.fileno())
        error = EngineExited(f"the model process exited{self._exit_code()}")
        self._fail_pending(error)
        if not self._stopping:
            log.error("%s: the server cannot answer embeddings any more", error)
            self.on_exit(str(error))

    def _fail_pending(self, error: Exception) -> None:
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
