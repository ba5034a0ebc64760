"""Where the model runs. `ModelRunner` is the model side of a batch (collate, one forward, per-row retry,
matryoshka truncation, one device-to-host copy); an engine runs it either in a process of its own
(`ProcessEngine`, the default of `nova serve`) or on threads of the server process (`ThreadEngine`, when the
caller hands the server a model object: tests, Ray Serve replicas, `--engine thread`).

Why a process: a forward is hundreds of small torch operations and each one re-takes Python's GIL, while
the server process parses JSON, tokenizes and renders responses on other threads. Under load the model thread
queued behind them for the GIL (measured in docs/server.md), the way vLLM's API server slowed its engine until
vLLM V1 split them into two processes; TEI keeps its Python backend out of the router's process the same way.
The server process keeps the processor (tokenizing never leaves the HTTP side) and talks to the engine over
one pipe: prepared rows go in, numpy vectors (or a row's exception) come back.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("serve.engine")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclass
class Job:
    """One row as the engine sees it: what to embed and how."""

    prepared: object  # PreparedItem
    multivector: bool
    dimensions: int | None


# ------------------------------------------------------------------------------------------------ model side


def load_model_for(settings):
    """The model a server with these settings serves (device, dtype, chat template, adapter limits)."""
    import torch

    from nova.loading import load_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = None if settings.device == "auto" else settings.device
    dtype = getattr(torch, DTYPES[settings.dtype]) if settings.dtype != "auto" else None
    trust = True if settings.model is None else settings.trust_remote_code
    return load_model(settings.model, device=device, dtype=dtype, chat_template=settings.chat_template,
                      max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank, trust_remote_code=trust)


def prepare_for_serving(model, settings) -> None:
    """Once a model object exists: the prefix cache size, batch padding, `--load-lora` adapters and a warm-up
    forward."""
    from .adapters import peft_folder

    model.prefix_cache.configure(settings.prefix_cache_mb << 20)
    model.pad_to_multiple_of = settings.pad_to_multiple_of or None
    if settings.cuda_graphs:  # buckets up to the largest batch the batcher forms
        model.configure_cuda_graphs(True, max_rows=settings.max_batch_size)
    for name, path in settings.load_lora:
        folder = os.path.realpath(peft_folder(path))
        resident = model.list_adapters().get(name)
        if resident is not None:  # e.g. the model card's --load-lora retrieval=<the checkpoint's own folder>
            if os.path.realpath(str(resident.get("path"))) != folder:
                raise ValueError(f"--load-lora {name}={path}: an adapter {name!r} is already loaded from "
                                 f"{resident.get('path')}; load this one under another name")
            log.info("adapter %r: already loaded from %s", name, folder)
            continue
        model.load_adapter(name, folder)
        log.info("adapter %r loaded from %s", name, path)
    row = model.processor.prepare_item("warm-up", index=0, allow_paths=False)
    model.embed_prepared([row], False, collated=model.collate_rows([row]))


class ModelRunner:
    """A batch of jobs -> one outcome per job (a float32 numpy vector, or the exception that row raised)."""

    def __init__(self, model):
        self.model = model

    def collate(self, jobs: list[Job]):
        """Batch tensors for `jobs`, or None if collation failed (the rows are then run one by one)."""
        try:
            return self.model.collate_rows([job.prepared for job in jobs])
        except Exception:  # noqa: BLE001 - run() retries the rows one by one and reports each row's error
            return None

    def run(self, jobs: list[Job], collated) -> tuple[list, float]:
        """One forward (or, if it fails, one per row). Returns (outcomes, forward seconds)."""
        started = time.perf_counter()
        try:
            if collated is not None:
                return self._embed(jobs, collated), time.perf_counter() - started
        except Exception as exc:
            if len(jobs) == 1:
                return [exc], time.perf_counter() - started
            log.warning("batch of %d rows failed (%s); retrying rows one by one", len(jobs), exc)
        outcomes = []
        for job in jobs:
            try:
                outcomes.extend(self._embed([job], None))
            except Exception as exc:  # noqa: BLE001 - isolated to this row
                outcomes.append(exc)
        return outcomes, time.perf_counter() - started

    def _embed(self, jobs: list[Job], collated) -> list:
        vectors = self.model.embed_prepared([job.prepared for job in jobs], [job.multivector for job in jobs],
                                            collated=collated)
        out = []
        for job, vector in zip(jobs, vectors, strict=True):
            if isinstance(vector, Exception):  # this row's own error (a non-finite vector): its request only
                out.append(vector)
                continue
            if not job.multivector and job.dimensions is not None:
                vector = self.model.truncate(vector, job.dimensions)
            out.append(vector.float().numpy())
        return out


# ------------------------------------------------------------------------------------------------ engines


class ThreadEngine:
    """The runner on this process's threads: one collates, one runs forwards (so collation overlaps them)."""

    def __init__(self, model, torch_threads: int | None = None):
        self.model = model
        self.runner = ModelRunner(model)
        self._collate_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-collate")
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-model")
        if torch_threads:  # OpenMP keeps the thread count per thread: set it where the forwards run
            import torch

            self._model_thread.submit(torch.set_num_threads, torch_threads).result()

    async def embed(self, jobs: list[Job]) -> tuple[list, float, float]:
        """-> (outcomes, collate seconds, forward seconds)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        collated = await loop.run_in_executor(self._collate_thread, self.runner.collate, jobs)
        collate_seconds = time.perf_counter() - started
        outcomes, seconds = await loop.run_in_executor(self._model_thread, self.runner.run, jobs, collated)
        return outcomes, collate_seconds, seconds

    def prefix_cache_stats(self) -> dict:
        return self.model.prefix_cache.stats()

    async def stop(self) -> None:
        self._collate_thread.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._model_thread.shutdown, wait=True, cancel_futures=True)


class EngineExited(RuntimeError):
    """The model process is gone (crashed, killed, out of memory): the server cannot answer any more."""


class ModelLoadFailed(RuntimeError):
    """The model process could not load the model; the message is the original error, class name first."""


class RemoteModel:
    """The server process's view of a model that lives in the engine process: the processor (tokenizing
    happens here), the config, and adapter calls forwarded to the engine. Routing reads the adapter names
    mirrored here, refreshed after every load or unload."""

    def __init__(self, engine: ProcessEngine, info: dict):
        self._engine = engine
        self.processor = info["processor"]
        self.config = self.processor.config
        self.max_loras = info["max_loras"]
        self.max_lora_rank = info["max_lora_rank"]
        self._adapters = info["adapters"]
        self.processor.adapter_names = lambda: set(self._adapters)

    def check_dimensions(self, dimensions, return_multivector=False) -> None:
        self.processor.check_dimensions(dimensions, return_multivector)

    def list_adapters(self) -> dict[str, dict]:
        return dict(self._adapters)

    def load_adapter(self, name, path) -> list[str]:
        try:
            return self._engine.call("load_adapter", name, path)
        finally:
            self._adapters = self._engine.call("list_adapters")

    def unload_adapter(self, name) -> None:
        try:
            self._engine.call("unload_adapter", name)
        finally:
            self._adapters = self._engine.call("list_adapters")


class ProcessEngine:
    """The runner in a child process (spawned, so CUDA initializes there and only there). Two one-way pipes:
    requests ("embed", id, jobs) and ("call", id, method, args) go down one (blocking writes, so a large image
    batch never meets a full non-blocking pipe), replies (id, ok, value, prefix-cache stats) come up the other
    as length-prefixed pickles, read without blocking on the event loop as they arrive.
    The child ignores SIGINT/SIGTERM: the server drains in-flight requests first and then closes the pipe,
    which ends the child; if the server dies, the closed pipe ends it too."""

    def __init__(self, settings):
        self.settings = settings
        self.model: RemoteModel | None = None
        self.process = None
        self._conn = None  # requests, down
        self._replies = None  # replies, up (a Connection used only for its file descriptor)
        self._frames = FrameReader()
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._send_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-engine-send")
        self._stats: dict | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_exit = lambda message: None  # set by the server: the engine died under it

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
        from transformers.dynamic_module_utils import init_hf_modules

        init_hf_modules()  # the processor arrives pickled; its class is the model's remote code, a dynamic module
        context = multiprocessing.get_context("spawn")
        requests_in, requests_out = context.Pipe(duplex=False)
        replies_in, replies_out = context.Pipe(duplex=False)
        with self._lock:  # stop() may run meanwhile (the server stopped while this thread starts the child)
            if self._stopping:
                raise EngineExited("the server stopped before the model process started")
            self.process = context.Process(target=engine_main, args=(requests_in, replies_out, self.settings,
                                                                     os.getpid()), name="nova-engine", daemon=True)
            self.process.start()
        requests_in.close()
        replies_out.close()
        self._conn, self._replies = requests_out, replies_in
        message = None
        while message is None:
            chunk = os.read(replies_in.fileno(), 1 << 20)
            if not chunk:
                self.process.join(timeout=5)
                raise EngineExited(f"the model process exited while loading (exit code {self.process.exitcode})")
            message = next(self._frames.feed(chunk), None)
        kind, payload = message
        if kind == "failed":
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
        for connection in (self._conn, self._replies):
            if connection is not None:
                connection.close()
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

    async def embed(self, jobs: list[Job]) -> tuple[list, float, float]:
        """-> (outcomes, collate seconds, forward seconds). Text rows are pickled and sent from the event loop
        (a few kilobytes); batches with images are sent from a worker thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if any(_carries_image(job.prepared) for job in jobs):
            await loop.run_in_executor(self._send_thread, self._send, ("embed", jobs), future)
        else:
            self._send(("embed", jobs), future)
        return await future

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
            for request_id, ok, value, stats in self._frames.feed(chunk):
                if stats is not None:
                    self._stats = stats
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _exited(self) -> None:
        self._loop.remove_reader(self._replies.fileno())
        self.process.join(timeout=1)
        error = EngineExited(f"the model process exited (exit code {self.process.exitcode})")
        self._fail_pending(error)
        if not self._stopping:
            log.error("%s: the server cannot answer embeddings any more", error)
            self.on_exit(str(error))

    def _fail_pending(self, error: Exception) -> None:
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


class FrameReader:
    """Length-prefixed frames (8-byte big-endian length, then a pickle) out of a byte stream read in chunks."""

    HEADER = struct.Struct("!Q")

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, chunk: bytes):
        """Add `chunk`; yield every message now complete."""
        self._buffer += chunk
        while len(self._buffer) >= self.HEADER.size:
            (size,) = self.HEADER.unpack_from(self._buffer)
            end = self.HEADER.size + size
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[self.HEADER.size:end])
            del self._buffer[:end]
            yield pickle.loads(payload)


def write_frame(fd: int, payload: bytes) -> None:
    """One length-prefixed frame, written whole (the caller serializes writers)."""
    view = memoryview(FrameReader.HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def _carries_image(prepared) -> bool:
    return getattr(prepared, "pixel_values", None) is not None or getattr(prepared, "image_embeds", None) is not None


# ------------------------------------------------------------------------------------------------ child


def engine_main(requests, replies, settings, server_pid: int) -> None:
    """The engine process: load the model, then run forwards on this (the main) thread, which also receives and
    collates requests while it is idle; during a forward a second thread does (`RequestTurns`)."""
    _exit_with_server(server_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .logs import setup_logging

    setup_logging(settings.log_level)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # exceptions made _portable first
        try:
            with send_lock:
                write_frame(replies.fileno(), payload)
        except OSError:  # the server is gone; the request pipe's end of file stops this process
            pass

    try:
        model = load_model_for(settings)
        prepare_for_serving(model, settings)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        log.debug("model failed to load", exc_info=True)  # the server prints the message; --log-level debug
        send(("failed", f"{exc.__class__.__name__}: {exc}"))
        return
    runner = ModelRunner(model)

    def reply(request_id, ok, value, stats=None) -> None:
        send((request_id, ok, value, stats))

    send(("ready", {"processor": model.processor, "adapters": model.list_adapters(),
                    "max_loras": model.max_loras, "max_lora_rank": model.max_lora_rank,
                    "prefix_cache": model.prefix_cache.stats()}))
    calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-engine-calls")

    def call(request_id, method, args) -> None:
        try:
            reply(request_id, True, getattr(model, method)(*args))
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            reply(request_id, False, _portable(exc))

    def handle(message: tuple):
        """One request -> a collated batch to run, None (nothing to run), or STOP."""
        if message[0] == "embed":
            _, request_id, jobs = message
            started = time.perf_counter()
            collated = runner.collate(jobs)
            return request_id, jobs, collated, time.perf_counter() - started
        if message[0] == "call":
            _, request_id, method, args = message
            if method not in ("load_adapter", "unload_adapter", "list_adapters"):
                reply(request_id, False, ValueError(f"unknown engine call {method!r}"))
            else:
                calls.submit(call, request_id, method, args)
            return None
        return STOP

    turns = RequestTurns(requests, handle)
    threading.Thread(target=turns.receive_while_forwarding, name="nova-engine-receive", daemon=True).start()
    # Forwards run on the main thread: on a quiet 2-core machine a forward of the bench's "small" config ran
    # 11-16 ms here against 19-31 ms from a secondary thread (OpenMP's spinning workers; docs/server.md).
    while (item := turns.next_batch()) is not STOP:
        request_id, jobs, collated, collate_seconds = item
        outcomes, seconds = runner.run(jobs, collated)
        reply(request_id, True, ([_portable(o) for o in outcomes], collate_seconds, seconds),
              model.prefix_cache.stats())
    calls.shutdown(wait=True)


STOP = object()  # the server said stop, or closed the pipe


class RequestTurns:
    """Who reads the request pipe in the model process, and so who collates: the main thread whenever it is
    idle, so that a lone request goes from the pipe through collation into the forward on one thread (handing
    it over to a waiting main thread took 0.09-0.13 ms of wake-up: timestamps, 2-core sandbox, 2026-11-27);
    the receive thread while the main thread runs a forward, so that the next batch is received and collated
    meanwhile and the forward never waits for host work.

    One reader at a time: the main thread while `forwarding` is False, the receive thread while it is True.
    Only the main thread changes it, and it ends a forwarding turn under the lock, so a read the receive thread
    has begun (and its collation) finishes first; that batch then runs next."""

    def __init__(self, requests, handle: Callable[[tuple], object]):
        self.requests = requests
        self.handle = handle  # a request -> a collated batch, None (nothing to run) or STOP
        self.lock = threading.Lock()
        self.forwarding = False
        self.received: collections.deque = collections.deque()  # what the receive thread read, in order
        self._turn_started = threading.Event()
        self._turn_ended_r, self._turn_ended_w = os.pipe()  # wakes the receive thread out of its wait
        for fd in (self._turn_ended_r, self._turn_ended_w):
            os.set_blocking(fd, False)

    def _read(self):
        try:
            return self.handle(self.requests.recv())
        except (EOFError, OSError):  # the server closed the pipe, or is gone
            return STOP

    def next_batch(self):
        """Main thread: the next collated batch to run, or STOP; blocks while there is none."""
        with self.lock:
            if self.received:
                return self.received.popleft()
            if self.forwarding:  # take the pipe back
                self.forwarding = False
                self._turn_started.clear()
                with contextlib.suppress(BlockingIOError):  # full: the receive thread has wake-ups to read
                    os.write(self._turn_ended_w, b"\0")
        while (item := self._read()) is None:
            pass
        if item is not STOP:
            self.forwarding = True
            self._turn_started.set()
        return item

    def receive_while_forwarding(self) -> None:
        """The receive thread: read and collate requests while the main thread runs forwards."""
        while True:
            self._turn_started.wait()
            multiprocessing.connection.wait([self.requests, self._turn_ended_r])
            with self.lock:
                # poll(): the wake-up may be an earlier turn's end; then the pipe may be empty
                if not (self.forwarding and self.requests.poll()):
                    _drain(self._turn_ended_r)
                    continue
                item = self._read()
                if item is not None:
                    self.received.append(item)
            if item is STOP:
                return


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _exit_with_server(server_pid: int) -> None:
    """SIGTERM is ignored (the server drains first). A server that dies (SIGKILL, out of memory) closes the
    pipe, which ends a serving engine; one still loading a model (minutes, for a large one) is not reading the
    pipe, so a watchdog thread ends it as soon as the server is gone (it is re-parented)."""

    def watch() -> None:
        while os.getppid() == server_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="nova-engine-watchdog", daemon=True).start()


def _portable(outcome):
    """A row's outcome as it crosses to the server: arrays and picklable exceptions as they are."""
    if not isinstance(outcome, BaseException):
        return outcome
    try:
        pickle.dumps(outcome)
        return outcome
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{outcome.__class__.__name__}: {outcome}")
