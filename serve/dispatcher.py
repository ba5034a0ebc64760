"""The batch path's last stop in the event loop: hand a batch to the engine (engine/: the model's own process,
or threads of this one) and its results back to the batcher.

Two batches at most are in flight at once: one running and the next one being collated (or collated and
waiting; on a GPU, launched behind the running one), so that the forward never waits for host-side work. The
engine returns float32 numpy vectors, matryoshka-truncated, with one device-to-host copy per batch; response
encoding happens in the HTTP layer's worker pool.

If a batch fails, the engine retries its rows one by one, so that one bad row never fails another client's
rows; a row's item error is mapped to OpenAI's shape here (`errors.from_item_error`), naming the row's position
in its own request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from . import error_codes as codes
from .engine import Engine, EngineExited
from .errors import ApiError, from_item_error
from .rows import BatchResult, EmbeddingRow, RowOutcome

log = logging.getLogger("serve.dispatcher")

DEPTH = 2  # batches in flight at once: one running, one collated ahead


class QueuedRow(Protocol):
    """What the dispatcher reads of the batcher's queue entries (batcher.QueuedRow): the row to embed."""

    row: EmbeddingRow


class Dispatcher:
    """Keeps the engine fed: batches from the batcher go to the engine at once (the engine collates one while
    the other runs); the batcher paces itself on the predicted end of the running one."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine  # set once the model is loaded (state.py)
        # (batch, outcomes, its engine result or None when the engine failed it, wall seconds)
        self.on_batch_done: Callable[[list[QueuedRow], list[RowOutcome], BatchResult | None, float], None] = (
            lambda batch, outcomes, result, elapsed: None)
        self._in_flight = 0  # batches collating, waiting or running
        self._busy_until = 0.0  # predicted end of the last batch handed to the engine (monotonic)
        self._prepare_seconds = 0.0  # smoothed: from a batch's hand-off until it is collated, ready to launch
        self._launch_seconds = 0.0  # launches that ran ahead of a device (a GPU's); 0 on a CPU
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ state the batcher paces on

    def idle(self) -> bool:
        return self._in_flight == 0

    def has_room(self) -> bool:
        return self._in_flight < DEPTH

    def expected_free_at(self) -> float:
        """When the model thread should be free again (monotonic seconds): each batch submitted adds its
        predicted forward time after the previous one's end (one model thread, first in first out)."""
        return self._busy_until

    def host_lead(self) -> float:
        """How long before the model frees up the next batch must be handed over for the model not to wait:
        its preparation (to a model process: packing, the pipe, unpacking, collation), plus, where launches run
        ahead of a device, its launch (a GPU's eager forward launches
        thousands of kernels, tens of milliseconds of host work, while the device runs the previous one)."""
        return self._prepare_seconds + self._launch_seconds + 0.001

    # ------------------------------------------------------------------ running batches

    def submit(self, batch: list[QueuedRow], predicted_seconds: float) -> None:
        """Start collating `batch` now and run it when the model thread is free (returns at once)."""
        self._in_flight += 1
        now = time.monotonic()
        self._busy_until = max(self._busy_until, now + self.host_lead()) + predicted_seconds
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, batch: list[QueuedRow]) -> None:
        started = time.monotonic()
        result = None
        try:
            result = await self.engine.embed([queued.row for queued in batch])
            # what handing a batch over takes until it can launch: packing, the pipe, unpacking and collation
            # in a model process; collation alone where the engine reports no ready time
            prepared = result.collate_seconds if result.ready_at is None else result.ready_at - started
            self._prepare_seconds = _smoothed(self._prepare_seconds, prepared)
            self._launch_seconds = _smoothed(self._launch_seconds, result.launch_seconds)
            elapsed = result.forward_seconds
            outcomes = [_row_error(queued.row, o) if isinstance(o, Exception) else o
                        for queued, o in zip(batch, result.outcomes, strict=True)]
        except asyncio.CancelledError:
            raise
        except EngineExited as exc:  # logged once by the engine; the server is going down
            outcomes = [ApiError(503, str(exc), code=codes.MODEL_PROCESS_EXITED)] * len(batch)
            elapsed = time.monotonic() - started
        except Exception as exc:  # the engine itself failed: fail these rows, keep serving
            log.exception("the model engine failed a batch")
            outcomes, elapsed = [exc] * len(batch), time.monotonic() - started
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_until = time.monotonic()
        self.on_batch_done(batch, outcomes, result, elapsed)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.engine is not None:
            await self.engine.stop()


def _smoothed(mean: float, seconds: float) -> float:
    return seconds if not mean else 0.8 * mean + 0.2 * seconds


def _row_error(row: EmbeddingRow, exc: Exception) -> Exception:
    """An item error of this row -> its OpenAI error (naming the row's position in its request); anything else
    (a bug, a device failure) stays as it is and becomes a 500."""
    if isinstance(exc, ValueError):
        return from_item_error(exc, position=row.position)
    return exc
