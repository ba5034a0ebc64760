"""`ThreadEngine`: the model on threads of the server process (when the caller hands the server a model object:
tests, Ray Serve replicas, `--engine thread`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from ..rows import BatchResult, EmbeddingRow
from .runner import ModelRunner


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

    async def embed(self, rows: list[EmbeddingRow]) -> BatchResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        collated = await loop.run_in_executor(self._collate_thread, self.runner.collate, rows)
        collate_seconds = time.perf_counter() - started
        outcomes, times = await loop.run_in_executor(self._model_thread, self.runner.run, rows, collated)
        return BatchResult(outcomes, collate_seconds, times.seconds, None, times.thread_cpu_seconds)

    def prefix_cache_stats(self) -> dict:
        return self.model.prefix_cache.stats()

    async def stop(self) -> None:
        self._collate_thread.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._model_thread.shutdown, wait=True, cancel_futures=True)
