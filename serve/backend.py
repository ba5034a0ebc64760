"""The model side of the server: collate a batch on one host thread, run its forward on the model thread.

Two batches at most are in the backend at once: one running in the model thread and the next one being
collated (or collated and waiting), so that the forward never waits for host-side work. The forward returns
host tensors with one device-to-host copy per batch; matryoshka truncation and the conversion to numpy happen
here, response encoding happens in the HTTP layer's worker pool.

If a batch fails, its rows are retried one by one, so that one bad row never fails another client's rows;
a row's item error is mapped to OpenAI's shape here (`errors.from_item_error`), naming the row's position in
its own request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .errors import from_item_error

log = logging.getLogger("serve.backend")

DEPTH = 2  # batches in the backend at once: one running, one collated ahead


class Backend:
    def __init__(self, model=None):
        self.model = model
        self.on_batch_done: Callable[[list, list, float], None] = lambda batch, outcomes, elapsed: None
        self._collate_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-collate")
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-model")
        self._in_backend = 0  # batches collating, waiting or running
        self._busy_until = 0.0  # predicted end of the last batch handed to the model thread (monotonic)
        self._collate_seconds = 0.0
        self._tasks: set[asyncio.Task] = set()
        self.model_thread_ids: set[int] = set()

    # ------------------------------------------------------------------ state the batcher paces on

    def idle(self) -> bool:
        return self._in_backend == 0

    def has_room(self) -> bool:
        return self._in_backend < DEPTH

    def expected_free_at(self) -> float:
        """When the model thread should be free again (monotonic seconds): each batch submitted adds its
        predicted forward time after the previous one's end (one model thread, first in first out)."""
        return self._busy_until

    def collate_lead(self) -> float:
        return self._collate_seconds + 0.001

    # ------------------------------------------------------------------ running batches

    def submit(self, batch: list, predicted_seconds: float) -> None:
        """Start collating `batch` now and run it when the model thread is free (returns at once)."""
        self._in_backend += 1
        now = time.monotonic()
        self._busy_until = max(self._busy_until, now + self.collate_lead()) + predicted_seconds
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            try:
                collated = await loop.run_in_executor(self._collate_thread, self._collate, batch)
            except Exception:  # noqa: BLE001 - the model thread retries the rows one by one
                collated = None
            self._collate_seconds = 0.8 * self._collate_seconds + 0.2 * (time.monotonic() - started)
            outcomes, elapsed = await loop.run_in_executor(self._model_thread, self._run, batch, collated)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the executor itself failed: fail these rows, keep serving
            log.exception("model worker failed")
            outcomes, elapsed = [exc] * len(batch), time.monotonic() - started
        finally:
            self._in_backend -= 1
            if self._in_backend == 0:
                self._busy_until = time.monotonic()
        self.on_batch_done(batch, outcomes, elapsed)

    def _collate(self, batch: list):
        return self.model.collate_rows([row.prepared for row in batch])

    def _run(self, batch: list, collated) -> tuple[list, float]:
        """Model thread: one forward (or, if it fails, one per row). Returns (outcomes, forward seconds)."""
        self.model_thread_ids.add(threading.get_ident())
        started = time.perf_counter()
        try:
            if collated is not None:  # (a batch that failed to collate goes straight to the rows one by one)
                return self._embed(batch, collated), time.perf_counter() - started
        except Exception as exc:
            if len(batch) == 1:
                return [_row_error(batch[0], exc)], time.perf_counter() - started
            log.warning("batch of %d rows failed (%s); retrying rows one by one", len(batch), exc)
        outcomes = []
        for row in batch:
            try:
                outcomes.extend(self._embed([row], None))
            except Exception as exc:  # noqa: BLE001 - isolated to this row
                outcomes.append(_row_error(row, exc))
        return outcomes, time.perf_counter() - started

    def _embed(self, batch: list, collated) -> list:
        vectors = self.model.embed_prepared([r.prepared for r in batch], [r.multivector for r in batch],
                                            collated=collated)
        out = []
        for row, vector in zip(batch, vectors, strict=True):
            if not row.multivector and row.dimensions is not None:
                vector = self.model.truncate(vector, row.dimensions)
            out.append(vector.float().numpy())
        return out

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._collate_thread.shutdown(wait=False, cancel_futures=True)
        self._model_thread.shutdown(wait=True, cancel_futures=True)


def _row_error(row, exc: Exception) -> Exception:
    """An item error of this row -> its OpenAI error (naming the row's position in its request); anything else
    (a bug, a device failure) stays as it is and becomes a 500."""
    if isinstance(exc, ValueError):
        return from_item_error(exc, position=row.position)
    return exc
