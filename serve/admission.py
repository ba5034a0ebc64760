"""Admission: what may enter the queue, and what leaves it early.

- `RequestSlots`: at most `--max-concurrent-requests` embedding requests handled at once (429 beyond).
- `Tally`: a count a limit reads, kept in shared memory when several HTTP workers serve one model, so that
  the limits hold for the server as a whole.
- `AdapterGate`: rows naming an adapter are admitted only while it is ready; an unload first stops admitting,
  then waits for the admitted rows to finish (drain).
- `wait_for_disconnect`: a client that goes away frees its queued rows (the batcher drops them).
The queue's own token budget (429 + Retry-After) is checked by the batcher when rows are submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from . import error_codes as codes
from .errors import ApiError
from .metrics import Metrics


class Tally:
    """A count this process changes and a limit reads. `shared` (a `multiprocessing.Value` of every HTTP worker
    of one server) makes `total` the server's; `own` is always this process's part."""

    def __init__(self, shared=None):
        self.shared = shared
        self.own = 0

    def add(self, n: int) -> None:
        self.own += n
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared.value += n

    def add_if_below(self, limit: int) -> bool:
        """Add one unless the total has reached `limit` (checked and added atomically across workers)."""
        if self.shared is None:
            if self.own >= limit:
                return False
            self.own += 1
            return True
        with self.shared.get_lock():
            if self.shared.value >= limit:
                return False
            self.shared.value += 1
        self.own += 1
        return True

    @property
    def total(self) -> int:
        return self.shared.value if self.shared is not None else self.own


@dataclass
class SharedLimits:
    """The counts the limits read, in shared memory, one set per server: every HTTP worker adds its own."""

    requests: Any  # multiprocessing.Value("q"): embedding requests being handled
    queue_tokens: Any  # multiprocessing.Value("q"): tokens queued in every worker's batcher

    @classmethod
    def create(cls, context) -> SharedLimits:
        return cls(context.Value("q", 0), context.Value("q", 0))


class RequestSlots:
    def __init__(self, limit: int, metrics: Metrics, in_use: Tally | None = None):
        self.limit = limit
        self.metrics = metrics
        self.tally = in_use or Tally()

    @property
    def in_use(self) -> int:
        return self.tally.total

    @contextlib.contextmanager
    def hold(self, retry_after: Callable[[], int]):
        if not self.tally.add_if_below(self.limit):
            self.metrics.rejected.labels(codes.TOO_MANY_REQUESTS).inc()
            raise ApiError(429, f"too many concurrent requests (limit {self.limit})", code=codes.TOO_MANY_REQUESTS,
                           headers={"Retry-After": str(retry_after())})
        self.metrics.inflight_requests.set(self.tally.own)
        try:
            yield
        finally:
            self.tally.add(-1)
            self.metrics.inflight_requests.set(self.tally.own)


class AdapterGate:
    """Which adapters admit rows, and how many admitted rows each still has in flight."""

    def __init__(self, names: list[str] | None = None):
        self.state: dict[str, str] = {name: "ready" for name in names or []}
        self.in_flight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}

    def ready(self, name: str) -> bool:
        return self.state.get(name) == "ready"

    def ready_names(self) -> list[str]:
        return sorted(n for n, s in self.state.items() if s == "ready")

    def acquire(self, names: list[str | None]) -> None:
        """Admit rows using `names` (None = base model), all or none; 404 for an adapter not ready."""
        for name in names:
            if name is not None and not self.ready(name):
                raise adapter_not_found(name, self.ready_names())
        for name in names:
            if name is not None:
                self.in_flight[name] = self.in_flight.get(name, 0) + 1
                event = self._idle.get(name)
                if event is not None:
                    event.clear()

    def release(self, name: str | None) -> None:
        if name is None:
            return
        count = self.in_flight.get(name, 0) - 1
        if count <= 0:
            self.in_flight.pop(name, None)
            event = self._idle.get(name)
            if event is not None:
                event.set()
        else:
            self.in_flight[name] = count

    async def drain(self, name: str, timeout: float) -> bool:
        """Stop admitting `name` and wait until its admitted rows are done. False on timeout."""
        self.state[name] = "draining"
        if not self.in_flight.get(name):
            return True
        event = self._idle.setdefault(name, asyncio.Event())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._idle.pop(name, None)


def adapter_not_found(name: str, loaded: list[str], param: str | None = None) -> ApiError:
    return ApiError(
        404, f"adapter {name!r} is not loaded; loaded adapters: {', '.join(loaded) or 'none'}",
        code=codes.ADAPTER_NOT_FOUND, param=param,
    )


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
