"""The model process's main (`engine_main`): load the model, then run forwards on the main thread, which also
receives and collates requests while it is idle; during a forward a second thread does (`RequestTurns`).
One process may serve several HTTP workers (`nova serve --http-workers N`), one `Link` each: their waiting
batches run as one forward (`ForwardMerger`) and their adapters stay the same (`AdapterCalls`)."""

from __future__ import annotations

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..openmp import helper_pool, single_threaded_openmp
from ..rows import BatchResult, EmbeddingRow, ForwardShape, ForwardTimes
from .framing import write_frame
from .runner import LaunchedForward, ModelRunner, load_model_for, prepare_for_serving

log = logging.getLogger("serve.engine")


@dataclass
class Link:
    """One server process's pipes to the model process: requests come down `requests`, replies and notices go up
    `replies` (written as frames, one writer at a time)."""

    requests: multiprocessing.connection.Connection
    replies: multiprocessing.connection.Connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self) -> dict:  # the lock stays behind: the model process makes its own
        return {"requests": self.requests, "replies": self.replies}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def send(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # exceptions made _portable first
        try:
            with self.lock:
                write_frame(self.replies.fileno(), payload)
        except OSError:  # that server process is gone; its request pipe's end of file closes the link
            pass


@dataclass
class Part:
    """One server batch inside a forward: where its reply goes and how many of the forward's rows are its own."""

    link: int
    request_id: int
    rows: int


@dataclass
class Forward:
    """A collated forward: one server batch, or several (from different HTTP workers) run as one."""

    parts: list[Part]
    rows: list[EmbeddingRow]
    collated: object
    collate_seconds: float
    # time.monotonic() when it was built, right after its collation (the server's batcher times hand-offs by it)
    ready_at: float = field(default_factory=time.monotonic)

    @property
    def merged(self) -> bool:
        return len(self.parts) > 1


class ForwardMerger:
    """Joins a server batch to the forward waiting to run, when several HTTP workers feed this process: each
    worker forms its own batches, and without this their batches would run one after another, each a fraction
    of the budget. A batch joins only if no part of the waiting forward came from its own worker (a worker's
    batcher may have split its rows on purpose, to save padding) and the union fits the row and padded-token
    budget the workers' batchers use."""

    def __init__(self, runner: ModelRunner, max_rows: int, max_padded_tokens: int):
        self.runner = runner
        self.max_rows = max_rows
        self.max_padded_tokens = max_padded_tokens

    def join(self, waiting: Forward, batch: Forward) -> Forward | None:
        if any(part.link == batch.parts[0].link for part in waiting.parts):
            return None
        rows = waiting.rows + batch.rows
        if len(rows) > self.max_rows or len(rows) * max(row.tokens for row in rows) > self.max_padded_tokens:
            return None
        started = time.perf_counter()
        collated = self.runner.collate(rows)
        return Forward(waiting.parts + batch.parts, rows, collated,
                       waiting.collate_seconds + batch.collate_seconds + time.perf_counter() - started)


def engine_main(links: list[Link], settings, server_pid: int, wrap_model: Callable | None = None) -> None:
    """The engine process: load the model, then run forwards on this (the main) thread, which also receives and
    collates requests while it is idle; during a forward a second thread does (`RequestTurns`). `links` holds
    one `Link` per HTTP worker; `wrap_model` (picklable) wraps the loaded model (the stand-in forward)."""
    _exit_with_server(server_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..logs import setup_logging

    setup_logging(settings.log_level)
    try:
        model = load_model_for(settings)
        if wrap_model is not None:
            model = wrap_model(model)
        prepare_for_serving(model, settings)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        log.debug("model failed to load", exc_info=True)  # the server prints the message; --log-level debug
        for link in links:
            link.send(("failed", f"{exc.__class__.__name__}: {exc}"))
        return
    runner = ModelRunner(model)
    adapters = AdapterCalls(model, links, settings.lora_drain_timeout)
    for link in links:
        link.send(("ready", {"processor": model.processor, "adapters": model.list_adapters(),
                             "max_loras": model.max_loras, "max_lora_rank": model.max_lora_rank,
                             "prefix_cache": model.prefix_cache.stats()}))

    def handle(message: tuple, link: int):
        """One request -> a collated `Forward` to run, or None (nothing to run)."""
        if message[0] == "embed":
            _, request_id, packed = message
            started = time.perf_counter()
            rows = packed.unpack()
            collated = runner.collate(rows)
            return Forward([Part(link, request_id, len(rows))], rows, collated, time.perf_counter() - started)
        if message[0] == "call":
            _, request_id, method, args = message
            adapters.submit(link, request_id, method, args)
        elif message[0] == "drained":
            _, drain_id, drained = message
            adapters.drained(drain_id, drained)
        return None

    merger = ForwardMerger(runner, settings.max_batch_size, settings.max_batch_tokens) if len(links) > 1 else None
    turns = RequestTurns([link.requests for link in links], handle, merger.join if merger else None)
    threading.Thread(target=turns.receive_while_forwarding, name="nova-engine-receive", daemon=True).start()
    # Forwards run on the main thread: OpenMP's spinning workers serve its forwards faster than a secondary
    # thread's on a quiet CPU (bench/results/2026-11-27-cpu-server).
    run_forwards(turns, runner, links)
    adapters.shutdown()


def run_forwards(turns: RequestTurns, runner: ModelRunner, links: list[Link]) -> None:
    """Launch each batch `turns` gives, until it says STOP, and send each part its rows' outcomes.

    A forward whose vectors are on the host when its launch returns (the CPU) is finished on this thread, and
    its replies (pickling the vectors, writing the pipes) are sent from here when nothing waits to run, so
    that a lone request pays no thread hand-over; when the next forward is already collated, they go to the
    sender thread and that forward starts first. A forward a device still runs (a GPU) goes to the sender
    thread whole, which waits for its vectors while this thread launches the next forward behind it."""
    sender = helper_pool("nova-engine-reply")
    while (forward := turns.next_batch()) is not STOP:
        launched = runner.launch(forward.rows, forward.collated)
        stats = runner.model.prefix_cache.stats()  # read here: this thread's forwards change the cache
        if not launched.ready:
            sender.submit(_finish_and_send, runner, links, forward, launched, stats)
            continue
        replies = _replies(forward, runner.finish(launched), stats)
        if turns.received:
            sender.submit(_send_all, links, replies)
        else:
            _send_all(links, replies)
    sender.shutdown(wait=True)


def _replies(forward: Forward, finished: tuple[list, ForwardTimes], stats: dict) -> list[tuple[int, tuple]]:
    """(link, reply) per part of `forward`: each server batch gets its own rows' outcomes."""
    outcomes, times = finished
    outcomes = [_portable(o) for o in outcomes]
    shape = ForwardShape.of(forward.rows) if forward.merged else None
    replies, start = [], 0
    for part in forward.parts:
        result = BatchResult(outcomes[start:start + part.rows], forward.collate_seconds, times.seconds, shape,
                             times.thread_cpu_seconds, times.launch_seconds, forward.ready_at)
        replies.append((part.link, (part.request_id, True, result, stats)))
        start += part.rows
    return replies


def _finish_and_send(runner: ModelRunner, links: list[Link], forward: Forward, launched: LaunchedForward,
                     stats: dict) -> None:
    _send_all(links, _replies(forward, runner.finish(launched), stats))


def _send_all(links: list[Link], replies: list[tuple[int, tuple]]) -> None:
    for link, reply in replies:
        links[link].send(reply)


class AdapterCalls:
    """Adapter load/unload/list, called by the server processes, run one at a time on a thread of their own
    (a load reads files for seconds; forwards go on meanwhile).

    With several HTTP workers, every worker must route the same adapters: after a load or an unload every link
    gets the new list (`("adapters", {...})`), and an unload first asks the other workers to drain their
    admitted rows of that adapter (`("drain", id, name, timeout)`, answered by a `("drained", id, ok)`
    request), so that no row already admitted anywhere meets a missing adapter. If a worker cannot drain in
    time, the adapter stays and the unload fails with TimeoutError (the caller's 503)."""

    METHODS = ("load_adapter", "unload_adapter", "list_adapters")

    def __init__(self, model, links: list[Link], drain_timeout: float):
        self.model = model
        self.links = links
        self.drain_timeout = drain_timeout
        self._thread = helper_pool("nova-engine-calls")
        self._drain_ids = itertools.count()
        self._drains: dict[int, concurrent.futures.Future] = {}

    def submit(self, link: int, request_id: int, method: str, args: tuple) -> None:
        if method not in self.METHODS:
            self.links[link].send((request_id, False, ValueError(f"unknown engine call {method!r}"), None))
        else:
            self._thread.submit(self._call, link, request_id, method, args)

    def drained(self, drain_id: int, drained: bool) -> None:
        future = self._drains.get(drain_id)
        if future is not None and not future.done():
            future.set_result(drained)

    def shutdown(self) -> None:
        for future in list(self._drains.values()):
            if not future.done():
                future.set_result(False)
        self._thread.shutdown(wait=True)

    def _call(self, link: int, request_id: int, method: str, args: tuple) -> None:
        try:
            if method == "unload_adapter":
                self._drain_elsewhere(link, args[0])
            value = getattr(self.model, method)(*args)
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            self.links[link].send((request_id, False, _portable(exc), None))
            if method == "unload_adapter":
                self._broadcast()  # workers that drained route the adapter again
            return
        self.links[link].send((request_id, True, value, None))
        if method != "list_adapters" and len(self.links) > 1:
            self._broadcast()

    def _drain_elsewhere(self, caller: int, name: str) -> None:
        others = [i for i in range(len(self.links)) if i != caller]
        if not others:
            return
        waits = {}
        for i in others:
            drain_id = next(self._drain_ids)
            waits[i] = self._drains[drain_id] = concurrent.futures.Future()
            self.links[i].send(("drain", drain_id, name, self.drain_timeout))
        deadline = time.monotonic() + self.drain_timeout + 5.0
        try:
            for i, future in waits.items():
                try:
                    ok = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    ok = False
                if not ok:
                    raise TimeoutError(f"adapter {name!r} is still in use in HTTP worker {i} after "
                                       f"{self.drain_timeout:g}s; not unloaded")
        finally:
            for drain_id in [d for d, f in self._drains.items() if f in waits.values()]:
                self._drains.pop(drain_id, None)

    def _broadcast(self) -> None:
        adapters = self.model.list_adapters()
        for link in self.links:
            link.send(("adapters", adapters))


STOP = object()  # every server process said stop, or closed its pipe


class RequestTurns:
    """Who reads the request pipes in the model process, and so who collates: the main thread whenever it is
    idle, so that a lone request goes from the pipe through collation into the forward on one thread (handing
    it over to a waiting main thread would add a thread wake-up, ~0.1 ms, to a lone request's latency);
    the receive thread while the main thread runs a forward, so that the next batch is received and collated
    meanwhile and the forward never waits for host work.

    One reader at a time: the main thread while `forwarding` is False, the receive thread while it is True.
    Only the main thread changes it, and it ends a forwarding turn under the lock, so a read the receive thread
    has begun (and its collation) finishes first; that batch then runs next. With several pipes (one per HTTP
    worker), `join(waiting, new)` may run a batch the receive thread reads inside the forward already waiting
    (`ForwardMerger.join`; None: it waits on its own)."""

    def __init__(self, requests: list, handle: Callable[[tuple, int], object],
                 join: Callable[[object, object], object | None] | None = None):
        self.requests = list(requests)
        self.open = list(requests)  # pipes not yet closed (a "stop", or end of file)
        self.handle = handle  # (a request, its pipe's index) -> a collated batch, or None (nothing to run)
        self.join = join
        self.lock = threading.Lock()
        self.forwarding = False
        self.received: collections.deque = collections.deque()  # what the receive thread read, in order
        self._next = 0  # the pipe read first when several are ready (round robin)
        self._turn_started = threading.Event()
        self._turn_ended_r, self._turn_ended_w = os.pipe()  # wakes the receive thread out of its wait
        for fd in (self._turn_ended_r, self._turn_ended_w):
            os.set_blocking(fd, False)

    def _read(self, block: bool):
        """One message from a ready pipe -> a collated batch, None (nothing to run, or nothing ready when not
        blocking), or STOP once every pipe is closed."""
        if block and len(self.open) == 1:
            ready = list(self.open)  # one server process: read straight away (no select before a lone request)
        else:
            ready = multiprocessing.connection.wait(self.open, timeout=None if block else 0)
            if not ready:
                return None
        ready.sort(key=lambda pipe: (self.requests.index(pipe) - self._next) % len(self.requests))
        pipe = ready[0]
        index = self.requests.index(pipe)
        self._next = (index + 1) % len(self.requests)
        try:
            message = pipe.recv()
        except (EOFError, OSError):  # that server process closed the pipe, or is gone
            message = ("stop",)
        if message[0] == "stop":
            self.open.remove(pipe)
            return None if self.open else STOP
        return self.handle(message, index)

    def next_batch(self):
        """Main thread: the next collated batch to run, or STOP; blocks while there is none."""
        with self.lock:
            if self.received:
                return self.received.popleft()
            if not self.open:
                return STOP
            if self.forwarding:  # take the pipes back
                self.forwarding = False
                self._turn_started.clear()
                with contextlib.suppress(BlockingIOError):  # full: the receive thread has wake-ups to read
                    os.write(self._turn_ended_w, b"\0")
        while (item := self._read(block=True)) is None:
            pass
        if item is not STOP:
            self.forwarding = True
            self._turn_started.set()
        return item

    def receive_while_forwarding(self) -> None:
        """The receive thread: read and collate requests while the main thread runs forwards."""
        single_threaded_openmp()  # collation's torch work must not give this thread a team of its own
        while True:
            self._turn_started.wait()
            multiprocessing.connection.wait([*self.open, self._turn_ended_r])
            with self.lock:
                # the wake-up may be an earlier turn's end; then no pipe may be ready
                item = self._read(block=False) if self.forwarding else None
                if item is None:
                    _drain(self._turn_ended_r)
                    continue
                joined = None
                if self.join is not None and self.received and item is not STOP and self.received[-1] is not STOP:
                    joined = self.join(self.received[-1], item)
                if joined is not None:
                    self.received[-1] = joined
                else:
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
