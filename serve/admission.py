"""Admission: what may enter the queue, and what leaves it early.

- `RequestSlots`: at most `--max-concurrent-requests` embedding requests handled at once (429 beyond).
- `AdapterGate`: rows naming an adapter are admitted only while it is ready; an unload first stops admitting,
  then waits for the admitted rows to finish (drain).
- `wait_for_disconnect`: a client that goes away frees its queued rows (the batcher drops them).
The queue's own token budget (429 + Retry-After) is checked by the batcher when rows are submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.requests import Request

from . import error_codes as codes
from .errors import ApiError
from .metrics import Metrics


class RequestSlots:
    def __init__(self, limit: int, metrics: Metrics):
        self.limit = limit
        self.metrics = metrics
        self.in_use = 0

    @contextlib.contextmanager
    def hold(self, retry_after: Callable[[], int]):
        if self.in_use >= self.limit:
            self.metrics.rejected.labels(codes.TOO_MANY_REQUESTS).inc()
            raise ApiError(429, f"too many concurrent requests (limit {self.limit})", code=codes.TOO_MANY_REQUESTS,
                           headers={"Retry-After": str(retry_after())})
        self.in_use += 1
        self.metrics.inflight_requests.set(self.in_use)
        try:
            yield
        finally:
            self.in_use -= 1
            self.metrics.inflight_requests.set(self.in_use)


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
