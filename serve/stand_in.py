"""A stand-in for a GPU forward, so that the serving pipeline's behaviour under load (rows per batch, whether
the model ever waits for the host) can be measured and tested on any machine.

A GPU forward costs the host almost nothing: the launching thread hands kernels over and waits, without the
GIL, while the server's other threads parse, tokenize and render. On a CPU the real forward is the opposite
(every core busy, the GIL taken hundreds of times per batch), so a CPU run says little about how the server
would keep a GPU fed. `StandInModel` wraps a real model (processor, config, adapters, tokenization and
collation stay real) and replaces only the forward with a wait of a fixed cost per batch (plus, optionally,
per row) that releases the GIL, returning deterministic vectors of the real shapes.

By default the stand-in is asynchronous, as the model is on a GPU: a launch synthesizes the vectors (the
host's work) and queues the forward's cost on a device of its own (one thread that spends the forwards'
costs one after another, as a CUDA stream runs them), and the vectors can be read once the device has spent
it. So the engines' launch-ahead (the next forward launched while the device still runs the last) is what is
measured. `asynchronous=False` (`--stand-in-waits`) makes the launch itself wait, as a forward whose vectors
are on the host when its launch returns (the model on a CPU).

At the end of each forward it records what the model would do next (`ForwardEnds`): run the next forward at
once (already launched behind it, or collated and waiting for its launch), wait for one being launched or
collated, wait while rows sit in the batcher's queue, or idle with nothing to do. All but the first two and
the last are the model waiting on the host with work available.

Serve it with `python -m serve.stand_in --stand-in-ms 5 --port 8080` (bench/bench_load.py does), or hand it to
`serve.app.create_app(settings, model=StandInModel(...))`; the counts are exported on `/metrics` as
`nova_stand_in_*`.
"""

from __future__ import annotations

import argparse
import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NEXT_BATCH_STATES = ("launched", "launching", "ready", "collating", "queued", "empty")


@dataclass(frozen=True)
class ForwardCost:
    """What one stand-in forward costs: `batch_ms` per batch plus `row_ms` per row of device time (a GPU's
    forward of short rows is nearly flat in the row count up to its saturation point), and `launch_ms` of
    host work per launch, spent holding the GIL as Python does dispatching an eager forward's kernels (the
    asynchronous stand-in only)."""

    batch_ms: float
    row_ms: float = 0.0
    launch_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_ms < 0 or self.row_ms < 0 or self.launch_ms < 0:
            raise ValueError(f"a stand-in forward cost must not be negative, got batch_ms={self.batch_ms}, "
                             f"row_ms={self.row_ms}, launch_ms={self.launch_ms}")

    def seconds(self, rows: int) -> float:
        return (self.batch_ms + self.row_ms * rows) / 1000.0


@dataclass
class ForwardEnds:
    """Counts taken at the end of each forward, by what was there for the model to run next:
    `launched`: the next forward, already queued on the device behind this one (an asynchronous stand-in);
    `launching`: the next forward being launched (the device waits for the host's launch); `ready`: a batch
    already collated (the model goes on as soon as it is launched); `collating`: a batch taken but still being
    collated; `queued`: rows waiting in the batcher, none taken; `empty`: nothing to run (no demand).
    `busy_seconds`: forward time; `waiting_seconds`: time from a forward's end to the next one's start after the
    ends that were not `empty` (the model idle while work existed)."""

    forwards: int = 0
    rows: int = 0
    busy_seconds: float = 0.0
    waiting_seconds: float = 0.0
    next_batch: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NEXT_BATCH_STATES, 0))


@dataclass
class WaitedOutcomes:
    """A stand-in forward's outcomes, waited for already (the model's `PendingOutcomes`, ready)."""

    outcomes: list[torch.Tensor]
    ready = True

    def result(self) -> list[torch.Tensor]:
        return self.outcomes

    def device_seconds(self) -> None:
        return None


@dataclass
class DeviceForward:
    """A forward on the asynchronous stand-in's device: what it costs, and its outcomes, readable once `done`."""

    outcomes: list[torch.Tensor]
    cost_seconds: float
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None  # the device's time for it, once done

    @property
    def ready(self) -> bool:
        return self.done.is_set()

    def result(self) -> list[torch.Tensor]:
        self.done.wait()  # releases the GIL, as a thread waiting on a CUDA event does
        return self.outcomes

    def device_seconds(self) -> float | None:
        return self.seconds


class StandInModel:
    """A real model (`inner`) whose forward is replaced by a fixed-cost, GIL-free wait (see the module doc).

    `queued_rows`, when given, returns how many rows wait in the server's batcher; without it a forward that
    ends with no collated batch counts as `empty`, never `queued`. Everything the server uses besides the
    forward (processor, config, collate_rows, adapters, truncate, prefix cache, settings it assigns such as
    `pad_to_multiple_of`) is the inner model's own. `asynchronous`: see the module doc."""

    _OWN = frozenset({"inner", "cost", "queued_rows", "asynchronous", "ends", "_lock", "_collating", "_collated",
                      "_launching", "_last_end", "_last_end_waiting", "_device_queue"})

    def __init__(self, inner, cost: ForwardCost, queued_rows: Callable[[], int] | None = None,
                 asynchronous: bool = True):
        if cost.launch_ms and not asynchronous:
            raise ValueError("a stand-in launch cost (launch_ms) needs the asynchronous stand-in: a launch that "
                             "waits for its forward is the forward")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "queued_rows", queued_rows)
        object.__setattr__(self, "asynchronous", asynchronous)
        object.__setattr__(self, "_device_queue", None)  # the device's forwards, once one was launched
        object.__setattr__(self, "ends", ForwardEnds())
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_collating", 0)  # collate_rows calls in progress
        object.__setattr__(self, "_collated", 0)  # batches collated and not yet started
        object.__setattr__(self, "_launching", 0)  # launch_prepared calls in progress (asynchronous)
        object.__setattr__(self, "_last_end", None)
        object.__setattr__(self, "_last_end_waiting", False)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:  # what the server configures (pad_to_multiple_of, ...) must reach the model that collates
            setattr(self.inner, name, value)

    def collate_rows(self, rows, adapters=None, **kwargs):
        with self._lock:
            self._collating += 1
        try:
            collated = self.inner.collate_rows(rows, adapters, **kwargs)
        except BaseException:
            with self._lock:
                self._collating -= 1
            raise
        with self._lock:
            self._collating -= 1
            self._collated += 1
        return collated

    def snapshot(self) -> ForwardEnds:
        """A copy of the counts (they change on the model thread)."""
        with self._lock:
            e = self.ends
            return ForwardEnds(e.forwards, e.rows, e.busy_seconds, e.waiting_seconds, dict(e.next_batch))

    def launch_prepared(self, rows, return_multivector=False, collated=None) -> DeviceForward | WaitedOutcomes:
        """The model's launch. Asynchronous: the vectors are synthesized here and the forward's cost queued on
        the device. Otherwise the launch waits the cost itself and its outcomes are ready when it returns."""
        if not self.asynchronous:
            return WaitedOutcomes(self._waited_forward(rows, return_multivector, collated))
        with self._lock:
            if collated is not None:
                self._collated -= 1
            self._launching += 1
        try:
            started = time.perf_counter()
            forward = DeviceForward(self._outcomes(rows, return_multivector, collated), self.cost.seconds(len(rows)))
            while time.perf_counter() - started < self.cost.launch_ms / 1000.0:
                pass  # the launch's host work, holding the GIL but for the interpreter's switch interval
            if not rows:
                forward.seconds = 0.0
                forward.done.set()
                return forward
            with self._lock:
                if self._device_queue is None:
                    object.__setattr__(self, "_device_queue", queue.SimpleQueue())
                    threading.Thread(target=self._device, name="nova-stand-in-device", daemon=True).start()
                self._device_queue.put(forward)
            return forward
        finally:
            with self._lock:
                self._launching -= 1

    def embed_prepared(self, rows, return_multivector=False, collated=None) -> list[torch.Tensor]:
        """One forward, launched and waited for: one deterministic unit vector per row (a function of its
        tokens): the full-size pooled vector, or [n_tokens, multi_vector_projector_dim] for a multi-vector
        row."""
        return self.launch_prepared(rows, return_multivector, collated).result()

    @property
    def launches_ahead(self) -> bool:
        """The asynchronous stand-in's launches return before its forwards end, as a GPU's do."""
        return self.asynchronous

    def embed_batches(self, batches, return_multivector=False):
        """The model's own loop over a stream of batches (one launched ahead: `encode()` and `nova embed` use
        it), run on the stand-in's launches."""
        return type(self.inner).embed_batches(self, batches, return_multivector)

    def encode(self, items, **kwargs):
        """The model's own `encode()`, its batches run on the stand-in's launches."""
        return type(self.inner).encode(self, items, **kwargs)

    def _waited_forward(self, rows, return_multivector, collated) -> list[torch.Tensor]:
        """The synchronous stand-in's forward: its vectors, then the rest of its cost waited without the GIL."""
        started = time.perf_counter()
        with self._lock:
            if collated is not None:
                self._collated -= 1
            self._count_start(started)
        outcomes = self._outcomes(rows, return_multivector, collated)
        if not rows:
            return outcomes
        remaining = self.cost.seconds(len(rows)) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)  # releases the GIL, as a thread waiting on a GPU does
        ended = time.perf_counter()
        self._count_end(len(rows), ended - started, ended)
        return outcomes

    def _device(self) -> None:
        """The asynchronous stand-in's device: spends each launched forward's cost in launch order, one at a
        time, then makes its vectors readable."""
        while True:
            forward = self._device_queue.get()
            started = time.perf_counter()
            with self._lock:
                self._count_start(started)
            time.sleep(forward.cost_seconds)
            ended = time.perf_counter()
            forward.seconds = ended - started
            self._count_end(len(forward.outcomes), forward.seconds, ended)
            forward.done.set()

    @torch.inference_mode()
    def _outcomes(self, rows, return_multivector, collated) -> list[torch.Tensor]:
        if not rows:
            return []
        if collated is None:  # a row retried alone, or a caller that did not collate
            collated = self.inner.collate_rows(rows)
        wants = (list(return_multivector) if isinstance(return_multivector, (list, tuple))
                 else [bool(return_multivector)] * len(rows))
        return self._vectors(collated.batch, wants)

    def _vectors(self, batch: dict, wants: list[bool]) -> list[torch.Tensor]:
        """Batched, so that the host work per forward stays a few torch calls whatever the row count."""
        config = self.inner.config
        ids = batch.input_ids.double()  # [B, T]
        pool_mask = batch.pool_mask.bool()
        signature = (ids * pool_mask).sum(1, keepdim=True) + pool_mask.sum(1, keepdim=True) * 0.5  # [B, 1]
        frequencies = torch.arange(1, config.text_config.hidden_size + 1, dtype=torch.float64) * 1e-3
        pooled = F.normalize(torch.cos(signature * frequencies).float(), dim=-1)  # [B, hidden]
        tokens = None
        if any(wants):
            phase = ids[:, :, None] * 1e-3 + torch.arange(ids.shape[1], dtype=torch.float64)[None, :, None] * 0.1
            projector = torch.arange(1, config.multi_vector_projector_dim + 1, dtype=torch.float64)
            tokens = F.normalize(torch.cos(phase * projector).float(), dim=-1)  # [B, T, 128]
        multi_mask = batch.multi_mask.bool()
        return [tokens[i][multi_mask[i]] if want else pooled[i] for i, want in enumerate(wants)]

    def _count_start(self, started: float) -> None:
        """A forward starts (under the lock): the model's idle time since the last end counts if work existed."""
        if self._last_end is not None and self._last_end_waiting:
            self.ends.waiting_seconds += started - self._last_end

    def _count_end(self, rows: int, seconds: float, ended: float) -> None:
        queued = self.queued_rows() if self.queued_rows is not None else 0
        with self._lock:
            if self._device_queue is not None and not self._device_queue.empty():
                state = "launched"
            elif self._launching > 0:
                state = "launching"
            elif self._collated > 0:
                state = "ready"
            elif self._collating > 0:
                state = "collating"
            elif queued > 0:
                state = "queued"
            else:
                state = "empty"
            e = self.ends
            e.forwards += 1
            e.rows += rows
            e.busy_seconds += seconds
            e.next_batch[state] += 1
            object.__setattr__(self, "_last_end", ended)
            object.__setattr__(self, "_last_end_waiting", state != "empty")


def export_counts(metrics, model: StandInModel) -> None:
    """`nova_stand_in_*` on the server's /metrics, read at each scrape."""
    from prometheus_client.core import CounterMetricFamily

    class _Collector:
        def collect(self):
            e = model.snapshot()
            yield CounterMetricFamily("nova_stand_in_forwards", "stand-in forwards", value=e.forwards)
            yield CounterMetricFamily("nova_stand_in_rows", "rows through stand-in forwards", value=e.rows)
            yield CounterMetricFamily("nova_stand_in_busy_seconds", "seconds spent in stand-in forwards",
                                      value=e.busy_seconds)
            yield CounterMetricFamily("nova_stand_in_waiting_seconds", "seconds between a forward's end and the "
                                      "next one's start while work existed", value=e.waiting_seconds)
            ends = CounterMetricFamily("nova_stand_in_forward_ends", "forward ends, by what was there to run next",
                                       labels=["next_batch"])
            for state, count in e.next_batch.items():
                ends.add_metric([state], count)
            yield ends

    metrics.register(_Collector())


def create_stand_in_app(settings, cost: ForwardCost, inner=None, asynchronous: bool = True):
    """The server app around a stand-in of `inner` (default: the model `settings` name, loaded here), with the
    stand-in's counts on /metrics."""
    from .app import create_app
    from .engine import load_model_for

    model = StandInModel(inner if inner is not None else load_model_for(settings), cost,
                         asynchronous=asynchronous)
    app = create_app(settings, model=model)
    server = app.state.nova
    model.queued_rows = lambda: server.batcher.queued_rows if server.batcher is not None else 0
    export_counts(server.metrics, model)
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from .config import Settings
    from .logs import setup_logging

    parser = argparse.ArgumentParser(description="Serve a model with its forward replaced by a fixed-cost, "
                                     "GIL-free wait (the server's pipeline as a GPU would see it).")
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the tiny checkpoint)")
    parser.add_argument("--stand-in-ms", type=float, required=True, help="forward cost per batch, ms")
    parser.add_argument("--stand-in-row-ms", type=float, default=0.0, help="forward cost per row, ms")
    parser.add_argument("--stand-in-launch-ms", type=float, default=0.0,
                        help="host work per launch, ms, holding the GIL (an eager GPU forward's kernel launches)")
    parser.add_argument("--stand-in-waits", action="store_true",
                        help="the launch waits for the forward (a CPU's forward), instead of queueing it on an "
                             "asynchronous device (a GPU's)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=Settings.max_batch_size)
    parser.add_argument("--max-batch-tokens", type=int, default=Settings.max_batch_tokens)
    parser.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_ms)
    parser.add_argument("--max-concurrent-requests", type=int, default=Settings.max_concurrent_requests)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--http-workers", type=int, default=1,
                        help="HTTP worker processes; above 1 the stand-in runs in the model process they share, "
                             "and its counts are not exported")
    args = parser.parse_args(argv)
    workers = args.http_workers > 1
    settings = Settings(model=args.model, trust_remote_code=True, engine="process" if workers else "thread",
                        port=args.port, max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                        max_wait_ms=args.max_wait_ms, max_concurrent_requests=args.max_concurrent_requests,
                        log_level=args.log_level, http_workers=args.http_workers)
    setup_logging(settings.log_level)
    cost = ForwardCost(args.stand_in_ms, args.stand_in_row_ms, args.stand_in_launch_ms)
    if workers:
        from .listening import bind_listening_sockets
        from .workers import run_http_workers

        return run_http_workers(settings, bind_listening_sockets("127.0.0.1", args.port),
                                functools.partial(StandInModel, cost=cost, asynchronous=not args.stand_in_waits))
    app = create_stand_in_app(settings, cost, asynchronous=not args.stand_in_waits)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False,
                log_level=args.log_level, lifespan="on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
