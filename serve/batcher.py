"""The queue and batch forming: rows from many requests -> token-budget batches -> the dispatcher (dispatcher.py).

- Rows wait in one queue (FIFO for fairness). A batch always contains the oldest row (so nothing starves)
  plus the rows closest to it in length, packed while `rows x longest row <= max_batch_tokens` and
  `rows <= max_batch_size`; rows of any adapter, task, instruction and modality share a batch (the model
  routes adapters per row). A row's length counts its image's vision-tower patches too (rows.budget_tokens).
- No fixed wait (TEI's way): when the model is idle a batch leaves at once. `--max-wait-ms` (default 0) is only
  how long a row may wait for company while the model is idle; rows of requests that are received and still
  being tokenized (`preparing`) are worth a short grace (a quarter of the measured batch time, at most 50 ms),
  so that clients answered together do not split into alternating small and large batches.
- While the model is busy, rows gather; the next batch is taken shortly before the running one is predicted to
  end (the prediction is the cost model's, the lead the measured preparation time (from hand-off until the
  batch is collated, in the model process), plus on a GPU the measured
  launch time, plus how late this event loop has been running the batcher's timed wake-ups, `WakeLateness`),
  so that it is collated (and launched, on a GPU) while the current one runs and the model never waits for
  the host, even when a loaded event loop wakes the batcher late.
- Padding is paid for: when the rows at hand differ a lot in length, the candidate batch is split into
  length-sorted groups where that is cheaper under a cost model `seconds = a + b x padded_tokens (+ c x
  adapters)` fitted online to the measured batches (cost_model.py); the group holding the oldest row runs
  now, the rest later. Where a forward has a high fixed cost (GPUs) the fit keeps batches whole; it never
  learns from a batch shape's first forward, whose one-time costs on a GPU would read as per-token cost.
- Admission is bounded in queued tokens: over `max_queue_tokens` a request is refused with 429 and a
  `Retry-After` estimated from the measured token throughput.
- A client that goes away cancels its queued rows; they are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import error_codes as codes
from .admission import Tally
from .cost_model import BatchCostModel
from .dispatcher import Dispatcher
from .errors import ApiError
from .metrics import Metrics
from .rows import BatchResult, EmbeddingRow, ForwardShape

log = logging.getLogger("serve.batcher")


@dataclass(eq=False)
class QueuedRow:
    """A row in the queue: the request's `EmbeddingRow`, its request's ticket, and where it stands."""

    row: EmbeddingRow
    ticket: Ticket
    enqueued: float = 0.0
    state: str = "new"  # new -> queued -> running -> done | cancelled

    @property
    def tokens(self) -> int:
        return self.row.tokens

    @property
    def adapter(self) -> str | None:
        return self.row.adapter

    @property
    def position(self) -> int:
        return self.row.position


@dataclass(eq=False)
class Ticket:
    """One request's rows; `future` resolves when all of them are done (or the first one fails)."""

    n_rows: int
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    rows: list[QueuedRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * self.n_rows
        self.remaining = self.n_rows


@dataclass
class WakeLateness:
    """How late the event loop runs the batcher's timed wake-ups. A loop busy parsing and rendering requests runs
    a timer after the callbacks ahead of it; a batch meant to be taken one collation before the running forward
    ends would then be collated after it, and the model would wait. The batcher takes the next batch earlier by
    `allowance()`: a smoothed mean plus two smoothed deviations of the observed lateness."""

    mean: float = 0.0
    deviation: float = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.deviation = 0.8 * self.deviation + 0.2 * abs(seconds - self.mean)
        self.mean = 0.8 * self.mean + 0.2 * seconds

    def allowance(self) -> float:
        return self.mean + 2.0 * self.deviation


class Batcher:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_tokens: int,
        metrics: Metrics,
        on_row_done: Callable[[QueuedRow], None] | None = None,
        queued: Tally | None = None,
    ):
        self.dispatcher = dispatcher
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.on_row_done = on_row_done or (lambda row: None)
        self._pending: list[QueuedRow] = []
        self._queued = queued or Tally()  # the budget counts every HTTP worker's queue when they share one model
        self.queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tokens_per_s = 0.0
        self._batch_seconds = 0.0
        self.cost = BatchCostModel()
        self.lateness = WakeLateness()
        metrics.watch_batch_cost(self.cost)
        metrics.watch_wake_lateness(self.lateness)
        metrics.watch_host_lead(dispatcher.host_lead)
        self.preparing = 0  # rows of admitted requests still being decoded/tokenized
        self._stopping = False
        dispatcher.on_batch_done = self._batch_done

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="nova-batcher")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for row in self._pending:
            if row.state == "queued":
                self._fail(row, ApiError(503, "server is shutting down", code=codes.SHUTTING_DOWN))
        self._pending.clear()

    # ------------------------------------------------------------------ admission

    @property
    def queued_tokens(self) -> int:
        """Tokens in this batcher's queue."""
        return self._queued.own

    @queued_tokens.setter
    def queued_tokens(self, value: int) -> None:
        self._queued.add(value - self._queued.own)

    def retry_after(self, extra_tokens: int = 0) -> int:
        rate = self._tokens_per_s or 2000.0
        return int(min(60, max(1, math.ceil((self.queued_tokens + extra_tokens) / rate))))

    def submit(self, rows: list[EmbeddingRow]) -> Ticket:
        """Enqueue one request's rows atomically; 429 if the queue is over its token budget."""
        if self._stopping:
            raise ApiError(503, "server is shutting down", code=codes.SHUTTING_DOWN, headers={"Retry-After": "5"})
        tokens = sum(row.tokens for row in rows)
        queued = self._queued.total
        if queued > 0 and queued + tokens > self.max_queue_tokens:
            self.metrics.rejected.labels(codes.QUEUE_FULL).inc()
            retry = self.retry_after(tokens)
            raise ApiError(
                429,
                f"the server queue is full ({queued} tokens queued, limit {self.max_queue_tokens}); "
                f"retry after {retry}s",
                code=codes.QUEUE_FULL,
                headers={"Retry-After": str(retry)},
            )
        loop = asyncio.get_running_loop()
        ticket = Ticket(n_rows=len(rows), future=loop.create_future())
        now = time.monotonic()
        for row in rows:
            queued = QueuedRow(row, ticket, enqueued=now, state="queued")
            ticket.rows.append(queued)
            self._pending.append(queued)
        self.queued_tokens += tokens
        self.queued_rows += len(rows)
        self._update_gauges()
        self._wake()
        return ticket

    def cancel(self, ticket: Ticket) -> int:
        """Drop a request's queued rows (its client went away). Returns how many were dropped."""
        ticket.cancelled = True
        dropped = 0
        for row in ticket.rows:
            if row.state == "queued":
                row.state = "cancelled"
                self.queued_tokens -= row.tokens
                self.queued_rows -= 1
                dropped += 1
                self.on_row_done(row)
        if dropped:
            self.metrics.rows_cancelled.inc(dropped)
            self._pending = [r for r in self._pending if r.state == "queued"]
            self._update_gauges()
        if not ticket.future.done():
            ticket.future.cancel()
        return dropped

    def _update_gauges(self) -> None:
        self.metrics.queue_rows.set(self.queued_rows)
        self.metrics.queue_tokens.set(self.queued_tokens)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def preparing_started(self, rows: int) -> None:
        self.preparing += rows

    def preparing_done(self, rows: int) -> None:
        self.preparing -= rows
        self._wake()

    # ------------------------------------------------------------------ batch forming

    def _budget_full(self) -> bool:
        return self.queued_rows >= self.max_batch_size or self.queued_tokens >= self.max_batch_tokens

    def _take_batch(self) -> list[QueuedRow]:
        pending = [r for r in self._pending if r.state == "queued"]
        if not pending:
            self._pending = []
            return []
        anchor = pending[0]
        others = sorted(pending[1:], key=lambda r: (abs(r.tokens - anchor.tokens), r.enqueued))
        batch = [anchor]
        longest = anchor.tokens
        for row in others:
            if len(batch) >= self.max_batch_size:
                break
            new_longest = max(longest, row.tokens)
            if new_longest * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(row)
            longest = new_longest
        batch = self.cost.split(batch, anchor)
        taken = set(map(id, batch))
        self._pending = [r for r in pending if id(r) not in taken]
        for row in batch:
            row.state = "running"
            self.queued_tokens -= row.tokens
            self.queued_rows -= 1
        self._update_gauges()
        batch.sort(key=lambda r: r.tokens)
        return batch

    def _take_at(self) -> float:
        """When the next batch should leave (monotonic seconds; 0 = now), given the dispatcher's state."""
        oldest = next(r for r in self._pending if r.state == "queued")
        if self.dispatcher.idle():
            # nothing to wait behind: leave at once, or after a bounded wait for company
            deadline = oldest.enqueued + self.max_wait
            if self.preparing > 0:
                deadline = max(deadline, oldest.enqueued + min(0.05, 0.25 * self._batch_seconds))
            return deadline
        if not self.dispatcher.has_room():
            return math.inf  # a batch is already collated and waiting: gather until the model takes it
        # one batch running: take the next so that it is ready just before the model frees up, allowing for a
        # late wake-up, but never before half of the running batch's time (its rows would miss the next batch)
        early = min(self.lateness.allowance(), 0.5 * self._batch_seconds)
        return self.dispatcher.expected_free_at() - self.dispatcher.host_lead() - early

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not any(r.state == "queued" for r in self._pending):
                self._pending = []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            while not (self._budget_full() and self.dispatcher.has_room()):
                take_at = self._take_at()
                now = time.monotonic()
                if now >= take_at:
                    break
                self._wakeup.clear()
                try:
                    timeout = None if math.isinf(take_at) else take_at - now
                    await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
                except asyncio.TimeoutError:
                    self.lateness.observe(time.monotonic() - take_at)
                if not any(r.state == "queued" for r in self._pending):
                    break
            batch = self._take_batch()
            if not batch:
                continue
            started = time.monotonic()
            for row in batch:
                self.metrics.queue_wait.observe(started - row.enqueued)
            predicted = self.cost.predict(len(batch) * batch[-1].tokens, len({r.adapter for r in batch}))
            self.dispatcher.submit(batch, predicted if predicted is not None else self._batch_seconds)

    # ------------------------------------------------------------------ results (called by the dispatcher)

    def _batch_done(self, batch: list[QueuedRow], outcomes: list, result: BatchResult | None, elapsed: float) -> None:
        """Results first: the waiting handlers are scheduled before anything else runs. What the batch teaches
        (throughput, the cost fit, the batch metrics) is learned in the loop's next turn, after those handlers
        have resumed, so that learning never adds to a request's latency."""
        for row, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._fail(row, outcome)
            else:
                self._deliver(row, outcome)
        self._wake()
        asyncio.get_running_loop().call_soon(self._learn, batch, max(elapsed, 1e-6), result)

    def _learn(self, batch: list[QueuedRow], elapsed: float, result: BatchResult | None = None) -> None:
        """`result`: what the engine said of the forward (None when the engine failed the batch)."""
        tokens = sum(r.tokens for r in batch)
        rate = tokens / elapsed
        self._tokens_per_s = rate if not self._tokens_per_s else 0.8 * self._tokens_per_s + 0.2 * rate
        self._batch_seconds = elapsed if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * elapsed
        longest = max(r.tokens for r in batch)
        padded = len(batch) * longest
        ran = (result.forward if result is not None else None) or ForwardShape(
            len(batch), longest, len({r.adapter for r in batch}))
        self.cost.observe(ran.padded_tokens, elapsed, ran.adapters, shape=(ran.rows, ran.longest))
        m = self.metrics
        m.batch_rows.observe(len(batch))
        m.batch_tokens.observe(tokens)
        m.batch_padded_tokens.observe(padded)
        m.batch_requests.observe(len({id(r.ticket) for r in batch}))
        m.batch_latency.observe(elapsed)
        share = len(batch) / ran.rows  # of the forward this batch ran in: summed over workers, the whole of it
        m.model_busy.inc(elapsed * share)
        m.model_forwards.inc(share)
        if result is not None:
            m.model_thread_cpu.inc(result.forward_cpu_seconds * share)
        m.tokens.inc(tokens)
        for row in batch:
            m.adapter_rows.labels(row.adapter or "none").inc()

    def _deliver(self, row: QueuedRow, value) -> None:
        row.state = "done"
        self.on_row_done(row)
        ticket = row.ticket
        if ticket.future.done():
            return
        ticket.results[row.position] = value
        ticket.remaining -= 1
        if ticket.remaining == 0:
            ticket.future.set_result(ticket.results)

    def _fail(self, row: QueuedRow, exc: BaseException) -> None:
        row.state = "done"
        self.on_row_done(row)
        ticket = row.ticket
        if not ticket.future.done():
            ticket.future.set_exception(exc)
        # the ticket failed: its other queued rows are useless now
        for other in ticket.rows:
            if other.state == "queued":
                other.state = "cancelled"
                self.queued_tokens -= other.tokens
                self.queued_rows -= 1
                self.on_row_done(other)
        self._update_gauges()
