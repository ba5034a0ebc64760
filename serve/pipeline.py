"""One parsed request's way to its vectors, whatever route it came in by (`/v1/embeddings`, `/v1/rerank`, TEI's
routes: each builds an `EmbeddingRequest` and calls `embed_request`):

request checks (model name, dimensions, prompt set) -> routes resolved and checked against the adapter gate
(preparation.py) -> images fetched -> items tokenized into `EmbeddingRow`s -> admission (the gate, then the
queue's budget, atomically on the event loop) -> the batcher's queue -> the ticket's vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request

from . import error_codes as codes
from .admission import wait_for_disconnect
from .errors import ApiError, bad_request
from .rows import EmbeddingRow
from .schemas import EmbeddingRequest
from .state import ServerState

log = logging.getLogger("serve")


@contextlib.contextmanager
def counted_refusals(server: ServerState):
    """A request's refusals (ApiError) counted in `nova_rejected_requests` by code, once, where they are raised:
    every route parses inside one, and the pipeline's own steps are inside one."""
    try:
        yield
    except ApiError as exc:
        server.metrics.rejected.labels(exc.code or str(exc.status)).inc()
        raise


class ClientGone(Exception):
    """The client disconnected while its rows were queued or running; they were dropped (answered 499)."""


@dataclass
class EmbeddingResult:
    """A request's answer: one float32 vector per item, in the request's order, and the rows they came from
    (token counts, truncation flags)."""

    vectors: list[np.ndarray]
    rows: list[EmbeddingRow]

    @property
    def tokens(self) -> int:
        return sum(row.prepared.num_tokens for row in self.rows)


async def embed_request(server: ServerState, request: Request, req: EmbeddingRequest) -> EmbeddingResult:
    """Raises `ApiError` (counted in `nova_rejected_requests`) for a request or row that cannot be served, and
    `ClientGone` when the client left before its answer."""
    started = time.perf_counter()
    rows = await _prepare(server, req)
    ticket = _admit(server, rows)
    metrics = server.metrics
    for item in req.items:
        metrics.items.labels("+".join(k for k in ("text", "image", "image_embeds") if k in item)).inc()
    queued = time.perf_counter()
    metrics.request_preparation.observe(queued - started)

    # The handler awaits its ticket alone (one wake-up when the rows are done); a client that goes away
    # cancels the ticket from the watcher's callback, dropping its queued rows.
    def client_gone(watcher: asyncio.Future) -> None:
        if not watcher.cancelled():
            log.info("client went away; dropped %d queued row(s)", server.batcher.cancel(ticket))

    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    disconnect.add_done_callback(client_gone)
    try:
        vectors = await ticket.future  # an ApiError of a row, or a bug (500), is raised here
    except asyncio.CancelledError:
        if not ticket.cancelled:  # this handler was cancelled (shutdown), not its client gone
            server.batcher.cancel(ticket)
            raise
        metrics.rejected.labels(codes.CLIENT_DISCONNECTED).inc()
        raise ClientGone() from None
    finally:
        disconnect.cancel()
    metrics.request_inference.observe(time.perf_counter() - queued)
    return EmbeddingResult(vectors, rows)


async def _prepare(server: ServerState, req: EmbeddingRequest) -> list[EmbeddingRow]:
    model = server.model
    with counted_refusals(server):
        model_adapter = server.resolve_model_name(req.model)
        req.model_label = req.model or server.settings.primary_model_name
        try:
            model.check_dimensions(req.dimensions, req.return_multivector)
        except ValueError as exc:
            raise bad_request(str(exc), param="dimensions") from None
        if req.prompt_set is not None and req.prompt_set not in model.config.prompt_sets:
            raise bad_request(f"unknown prompt_set {req.prompt_set!r}; known: {sorted(model.config.prompt_sets)}",
                              param="prompt_set")
        routes = server.preparer.resolve_routes(model, req, model_adapter, server.gate)
        images = await server.preparer.fetch_images(req)
        server.batcher.preparing_started(len(req.items))
        try:
            return await server.preparer.prepare(model, req, routes, images)
        finally:
            server.batcher.preparing_done(len(req.items))


def _admit(server: ServerState, rows: list[EmbeddingRow]):
    """The adapter gate (drain-aware), then the queue's budget: both or neither."""
    adapters = [row.adapter for row in rows]
    with counted_refusals(server):
        server.gate.acquire(adapters)
    try:
        return server.batcher.submit(rows)
    except ApiError:
        for name in adapters:
            server.gate.release(name)
        raise
