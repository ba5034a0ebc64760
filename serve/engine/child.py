"""The model process's main (`engine_main`): load the model, then run forwards on the main thread, which also
receives and collates requests while it is idle; during a forward a second thread does (`RequestTurns`)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable

from ..rows import BatchResult
from .framing import write_frame
from .runner import ModelRunner, load_model_for, prepare_for_serving

log = logging.getLogger("serve.engine")


def engine_main(requests, replies, settings, server_pid: int) -> None:
    """The engine process: load the model, then run forwards on this (the main) thread, which also receives and
    collates requests while it is idle; during a forward a second thread does (`RequestTurns`)."""
    _exit_with_server(server_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..logs import setup_logging

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
            _, request_id, rows = message
            started = time.perf_counter()
            collated = runner.collate(rows)
            return request_id, rows, collated, time.perf_counter() - started
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
    # Forwards run on the main thread: OpenMP's spinning workers serve its forwards faster than a secondary
    # thread's on a quiet CPU (bench/results/2026-11-27-cpu-server).
    # A batch's reply (pickling its vectors, writing the pipe) is sent from here when nothing waits to run, so
    # that a lone request pays no thread hand-over; when the next batch is already collated, the reply goes to
    # the sender thread and that batch's forward starts first.
    sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-engine-reply")
    while (item := turns.next_batch()) is not STOP:
        request_id, rows, collated, collate_seconds = item
        outcomes, seconds = runner.run(rows, collated)
        result = BatchResult([_portable(o) for o in outcomes], collate_seconds, seconds)
        if turns.received:
            sender.submit(reply, request_id, True, result, model.prefix_cache.stats())
        else:
            reply(request_id, True, result, model.prefix_cache.stats())
    sender.shutdown(wait=True)
    calls.shutdown(wait=True)


STOP = object()  # the server said stop, or closed the pipe


class RequestTurns:
    """Who reads the request pipe in the model process, and so who collates: the main thread whenever it is
    idle, so that a lone request goes from the pipe through collation into the forward on one thread (handing
    it over to a waiting main thread would add a thread wake-up, ~0.1 ms, to a lone request's latency);
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
