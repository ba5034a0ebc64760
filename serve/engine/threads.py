"""`ThreadEngine`: the model on threads of the server process (when the caller hands the server a model object:
tests, Ray Serve replicas, `--engine thread`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from ..openmp import helper_pool
from ..rows import BatchResult, EmbeddingRow, ForwardTimes, RowOutcome
from .runner import LaunchedForward, ModelRunner


class ThreadEngine:
    """The runner on this process's threads: one collates, one launches forwards, one waits for a device's
    vectors. On a GPU a launch returns while the device still runs the forward; its vectors are awaited on the
    finishing thread, so the next forward is launched behind it and the device never waits for the host. On a
    CPU the vectors are there when the launch returns and the launching thread finishes the forward itself (no
    extra thread hand-over)."""

    def __init__(self, model, torch_threads: int | None = None):
        self.model = model
        self.runner = ModelRunner(model)
        # only the model thread gets an OpenMP team (serve/openmp.py)
        self._collate_thread = helper_pool("nova-collate")
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nova-model")
        self._finish_thread = helper_pool("nova-finish")
        if torch_threads:  # OpenMP keeps the thread count per thread: set it where the forwards run
            import torch

            self._model_thread.submit(torch.set_num_threads, torch_threads).result()

    async def embed(self, rows: list[EmbeddingRow]) -> BatchResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        collated = await loop.run_in_executor(self._collate_thread, self.runner.collate, rows)
        collate_seconds, ready_at = time.perf_counter() - started, time.monotonic()
        done = await loop.run_in_executor(self._model_thread, self._launch, rows, collated)
        if isinstance(done, LaunchedForward):  # the device still runs it
            done = await loop.run_in_executor(self._finish_thread, self.runner.finish, done)
        outcomes, times = done
        return BatchResult(outcomes, collate_seconds, times.seconds, None, times.thread_cpu_seconds,
                           times.launch_seconds, ready_at)

    def _launch(self, rows: list[EmbeddingRow], collated) -> LaunchedForward | tuple[list[RowOutcome], ForwardTimes]:
        """Model thread: launch the forward; finish it here if its vectors are already on the host."""
        launched = self.runner.launch(rows, collated)
        return self.runner.finish(launched) if launched.ready else launched

    def prefix_cache_stats(self) -> dict:
        return self.model.prefix_cache.stats()

    async def stop(self) -> None:
        self._collate_thread.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._model_thread.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._finish_thread.shutdown, wait=True, cancel_futures=True)
