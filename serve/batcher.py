"""Dynamic batching: rows from many requests -> token-budget batches -> one model worker thread.

- Rows wait in one queue (FIFO for fairness). A batch always contains the oldest row (so nothing
  starves) plus the rows closest to it in length, packed while `rows x longest row <= max_batch_tokens`
  and `rows <= max_batch_size`; rows of any adapter, task, instruction and modality share a batch
  (the model routes adapters per row).
- Wait is bounded: a batch leaves when the budget is full or `max_wait_ms` after its oldest row arrived,
  whichever comes first (a row that already waited behind a running batch does not wait again). Rows of
  requests that are already received and being tokenized (`preparing`) are worth waiting for a little
  longer: up to a quarter of the measured batch time (at most 50 ms), so that clients answered together
  do not split into alternating small and large batches.
- Padding is paid for: when the rows at hand differ a lot in length (few clients, so little to sort),
  the candidate batch is split into length-sorted groups where that is cheaper under a cost model
  `seconds = a + b x padded_tokens` fitted online to the measured batches (`BatchCostModel`); the group
  holding the oldest row runs now, the rest runs next. On hardware where a forward has a high fixed cost
  (GPUs) the fit keeps batches whole; on CPUs, where cost follows padded tokens, it avoids padding.
- The forward runs in a single worker thread, never on the event loop.
- Admission is bounded in queued tokens: over `max_queue_tokens` the request is refused with 429 and a
  `Retry-After` estimated from the measured token throughput.
- A client that goes away cancels its queued rows; they are dropped before they reach the model.
- If a batch fails, its rows are retried one by one, so one bad row never fails another client's rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import ApiError
from .metrics import Metrics

log = logging.getLogger("serve.batcher")


@dataclass(eq=False)
class Row:
    prepared: object  # PreparedItem
    multivector: bool
    dimensions: int | None
    ticket: Ticket
    position: int  # index of the row in its request
    tokens: int
    adapter: str | None
    enqueued: float = 0.0
    state: str = "new"  # new -> queued -> running -> done | cancelled


@dataclass(eq=False)
class Ticket:
    """One request's rows; `future` resolves when all of them are done (or the first one fails)."""

    n_rows: int
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results = [None] * self.n_rows
        self.remaining = self.n_rows


class BatchCostModel:
    """`seconds ~ a + b * padded_tokens + c * adapters_in_batch`, least squares over recent batches; splits
    candidate batches into contiguous length-sorted groups when that lowers the predicted total time.
    (Each distinct adapter in a forward costs its own per-module work, so splitting a mixed-adapter batch
    is dearer than splitting a single-adapter one.)"""

    def __init__(self, window: int = 64, min_samples: int = 8):
        self.samples: list[tuple[float, float, float]] = []
        self.window = window
        self.min_samples = min_samples
        self.a: float | None = None
        self.b: float | None = None
        self.c: float = 0.0

    def observe(self, padded_tokens: int, seconds: float, adapters: int = 1) -> None:
        self.samples.append((float(padded_tokens), float(adapters), float(seconds)))
        del self.samples[: -self.window]
        if len(self.samples) < self.min_samples:
            return
        data = np.array(self.samples)
        xs, ns, ys = data[:, 0], data[:, 1], data[:, 2]
        if xs.std() < 0.1 * xs.mean():  # too little spread to separate fixed and per-token cost
            return
        columns = [np.ones_like(xs), xs] + ([ns] if ns.std() > 0 else [])
        coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), ys, rcond=None)
        if coef[1] <= 0:
            return
        self.a, self.b = max(float(coef[0]), 0.0), float(coef[1])
        self.c = max(float(coef[2]), 0.0) if len(coef) > 2 else 0.0

    def split(self, batch: list[Row], anchor: Row) -> list[Row]:
        if self.a is None or self.b is None or len(batch) < 2:
            return batch
        rows = sorted(batch, key=lambda r: r.tokens)
        n = len(rows)
        a, b, c = self.a, self.b, self.c
        # best[j]: cheapest cost of rows[:j] as contiguous groups; cut[j]: where the last group starts
        best = [0.0] + [float("inf")] * n
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            longest = rows[j - 1].tokens
            adapters: set = set()
            for i in range(j - 1, -1, -1):
                adapters.add(rows[i].adapter)
                cost = best[i] + a + b * (j - i) * longest + c * len(adapters)
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        j = n
        while j > 0:
            i = cut[j]
            group = rows[i:j]
            if any(r is anchor for r in group):
                return group
            j = i
        return batch


class Batcher:
    def __init__(
        self,
        model,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_tokens: int,
        metrics: Metrics,
        on_row_done: Callable[[Row], None] | None = None,
    ):
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.on_row_done = on_row_done or (lambda row: None)
        self._pending: list[Row] = []
        self.queued_tokens = 0
        self.queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-model")
        self._tokens_per_s = 0.0
        self._batch_seconds = 0.0
        self.cost = BatchCostModel()
        self.preparing = 0  # rows of admitted requests still being decoded/tokenized
        self._stopping = False
        self.batches_run = 0
        self.model_thread_ids: set[int] = set()

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
                self._fail(row, ApiError(503, "server is shutting down", code="shutting_down"))
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ admission

    def retry_after(self, extra_tokens: int = 0) -> int:
        rate = self._tokens_per_s or 2000.0
        return int(min(60, max(1, math.ceil((self.queued_tokens + extra_tokens) / rate))))

    def submit(self, rows_spec: list[dict]) -> Ticket:
        """Enqueue one request's rows atomically; 429 if the queue is over its token budget."""
        if self._stopping:
            raise ApiError(503, "server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        tokens = sum(spec["tokens"] for spec in rows_spec)
        if self.queued_tokens > 0 and self.queued_tokens + tokens > self.max_queue_tokens:
            self.metrics.rejected.labels("queue_full").inc()
            retry = self.retry_after(tokens)
            raise ApiError(
                429,
                f"the server queue is full ({self.queued_tokens} tokens queued, limit {self.max_queue_tokens}); "
                f"retry after {retry}s",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            )
        loop = asyncio.get_running_loop()
        ticket = Ticket(n_rows=len(rows_spec), future=loop.create_future())
        now = time.monotonic()
        for position, spec in enumerate(rows_spec):
            row = Row(
                prepared=spec["prepared"], multivector=spec["multivector"], dimensions=spec["dimensions"],
                ticket=ticket, position=position, tokens=spec["tokens"], adapter=spec["adapter"],
                enqueued=now, state="queued",
            )
            ticket.rows.append(row)
            self._pending.append(row)
        self.queued_tokens += tokens
        self.queued_rows += len(rows_spec)
        self._update_gauges()
        assert self._wakeup is not None
        self._wakeup.set()
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

    # ------------------------------------------------------------------ batching

    def _budget_full(self) -> bool:
        return self.queued_rows >= self.max_batch_size or self.queued_tokens >= self.max_batch_tokens

    def preparing_started(self, rows: int) -> None:
        self.preparing += rows

    def preparing_done(self, rows: int) -> None:
        self.preparing -= rows
        if self._wakeup is not None:
            self._wakeup.set()

    def _take_batch(self) -> list[Row]:
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

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not any(r.state == "queued" for r in self._pending):
                self._pending = []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = next(r for r in self._pending if r.state == "queued")
            deadline = oldest.enqueued + self.max_wait
            grace_deadline = deadline + min(0.05, 0.25 * self._batch_seconds)
            while not self._budget_full():
                now = time.monotonic()
                if now >= deadline and (self.preparing <= 0 or now >= grace_deadline):
                    break
                remaining = (deadline if now < deadline else grace_deadline) - now
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    pass  # re-check: past the deadline, rows still being prepared get a short grace
            batch = self._take_batch()
            if not batch:
                continue
            started = time.monotonic()
            for row in batch:
                self.metrics.queue_wait.observe(started - row.enqueued)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the executor itself failed: fail these rows, keep serving
                log.exception("model worker failed")
                outcomes = [exc] * len(batch)
            elapsed = max(time.monotonic() - started, 1e-6)
            tokens = sum(r.tokens for r in batch)
            rate = tokens / elapsed
            self._tokens_per_s = rate if not self._tokens_per_s else 0.8 * self._tokens_per_s + 0.2 * rate
            self._batch_seconds = elapsed if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * elapsed
            self.batches_run += 1
            self.metrics.batch_rows.observe(len(batch))
            self.metrics.batch_tokens.observe(tokens)
            padded = len(batch) * max(r.tokens for r in batch)
            self.cost.observe(padded, elapsed, len({r.adapter for r in batch}))
            self.metrics.batch_padded_tokens.observe(padded)
            self.metrics.batch_requests.observe(len({id(r.ticket) for r in batch}))
            self.metrics.batch_latency.observe(elapsed)
            self.metrics.tokens.inc(tokens)
            for row, outcome in zip(batch, outcomes, strict=True):
                self.metrics.adapter_rows.labels(row.adapter or "none").inc()
                if isinstance(outcome, BaseException):
                    self._fail(row, outcome)
                else:
                    self._deliver(row, outcome)

    # ------------------------------------------------------------------ worker thread

    def _run(self, batch: list[Row]) -> list:
        self.model_thread_ids.add(threading.get_ident())
        try:
            return self._embed(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.warning("batch of %d rows failed (%s); retrying rows one by one", len(batch), exc)
        outcomes = []
        for row in batch:
            try:
                outcomes.extend(self._embed([row]))
            except Exception as exc:  # noqa: BLE001 - isolated to this row
                outcomes.append(exc)
        return outcomes

    def _embed(self, batch: list[Row]) -> list[np.ndarray]:
        vectors = self.model.embed_prepared([r.prepared for r in batch], [r.multivector for r in batch])
        out = []
        for row, vector in zip(batch, vectors, strict=True):
            if not row.multivector and row.dimensions is not None:
                vector = self.model.truncate(vector, row.dimensions)
            out.append(vector.detach().to("cpu").float().numpy())
        return out

    # ------------------------------------------------------------------ results

    def _deliver(self, row: Row, value) -> None:
        row.state = "done"
        self.on_row_done(row)
        ticket = row.ticket
        if ticket.future.done():
            return
        ticket.results[row.position] = value
        ticket.remaining -= 1
        if ticket.remaining == 0:
            ticket.future.set_result(ticket.results)

    def _fail(self, row: Row, exc: BaseException) -> None:
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
