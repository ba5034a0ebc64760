"""HTTP: the routes, API-key checks, body reading and JSON parsing, response rendering, request ids.

`POST /v1/embeddings` reads here top-down: keys and readiness, a request slot, the body (bounded), JSON (parsed
off the event loop when large), the request forms (schemas.py), the request's vectors (pipeline.py), then the
vectors rendered to JSON or base64 (in the worker pool when large).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import error_codes as codes
from . import openapi
from .adapters import lora_routes
from .errors import ApiError, bad_request, request_id_var
from .pipeline import ClientGone, EmbeddingResult, counted_refusals, embed_request
from .rerank import rerank_routes
from .schemas import (
    LORA_LOAD_FIELDS,
    LORA_UNLOAD_FIELDS,
    EmbeddingRequest,
    parse_embedding_request,
    refuse_unknown_fields,
)
from .state import ServerState
from .tei import PATHS as TEI_PATHS
from .tei import tei_routes

access_log = logging.getLogger("serve.access")

ROUTES = (
    "/v1/embeddings", "/embeddings", "/v1/models", "/health", "/metrics", "/openapi.json",
    "/v1/internal/lora", "/v1/internal/lora/load", "/v1/internal/lora/unload",
    "/v1/rerank", "/v2/rerank", *TEI_PATHS,
)
# The JSON bodies of the admin routes (serve/adapters.py), by route: their fields are schemas.py's.
ADMIN_BODY_FIELDS = {"/v1/internal/lora/load": LORA_LOAD_FIELDS, "/v1/internal/lora/unload": LORA_UNLOAD_FIELDS}
PARSE_IN_POOL_BYTES = 64_000  # bodies larger than this are parsed in the worker pool, not on the event loop
RENDER_INLINE_VALUES = 4096  # responses with up to this many values (two 2048-d vectors) render on the event loop


# ---------------------------------------------------------------------- keys


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return request.headers.get("x-api-key")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _matches(token: str | None, keys: list[str]) -> bool:
    supplied = (token or "").encode()
    ok = False
    for key in keys:  # compare against every key, in constant time each
        ok |= hmac.compare_digest(supplied, key.encode())
    return ok and token is not None


def require_api_key(server: ServerState, request: Request) -> None:
    keys = list(server.settings.api_keys)
    if not keys:
        return
    if server.settings.admin_api_key:
        keys.append(server.settings.admin_api_key)
    if not _matches(_bearer(request), keys):
        server.metrics.rejected.labels("unauthorized").inc()
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code=codes.INVALID_API_KEY)


def require_admin(server: ServerState, request: Request) -> None:
    key = server.settings.admin_api_key
    if not key:
        raise ApiError(403, "admin routes need the server to be started with --admin-api-key", code=codes.ADMIN_DISABLED)
    if not _matches(_bearer(request), [key]):
        server.metrics.rejected.labels("unauthorized").inc()
        raise ApiError(401, "invalid or missing admin API key", code=codes.INVALID_API_KEY)


# ---------------------------------------------------------------------- bodies


async def read_body(server: ServerState, request: Request) -> bytes:
    limit = server.settings.payload_limit
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        server.metrics.rejected.labels(codes.PAYLOAD_TOO_LARGE).inc()
        raise ApiError(413, f"payload of {length} bytes is over the limit of {limit} bytes (--payload-limit)",
                       code=codes.PAYLOAD_TOO_LARGE)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                server.metrics.rejected.labels(codes.PAYLOAD_TOO_LARGE).inc()
                raise ApiError(413, f"payload is over the limit of {limit} bytes (--payload-limit)",
                               code=codes.PAYLOAD_TOO_LARGE)
            chunks.append(chunk)
    except ClientDisconnect:
        server.metrics.rejected.labels(codes.CLIENT_DISCONNECTED).inc()
        raise ApiError(400, "the client disconnected while sending the body", code=codes.CLIENT_DISCONNECTED) from None
    return b"".join(chunks)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes):
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise bad_request("request body is not valid JSON", code=codes.INVALID_JSON) from None


async def read_json(server: ServerState, request: Request):
    body = await read_body(server, request)
    try:
        if len(body) > PARSE_IN_POOL_BYTES and server.preparer is not None:
            return await asyncio.get_running_loop().run_in_executor(server.preparer.pool, _parse_json, body)
        return _parse_json(body)
    except ApiError:  # (only invalid JSON: the body limits were checked above)
        server.metrics.rejected.labels(codes.INVALID_JSON).inc()
        raise


async def read_json_object(server: ServerState, request: Request, fields) -> dict:
    """The body as a JSON object with no field outside `fields` (a 400 naming every unknown one)."""
    payload = await read_json(server, request)
    with counted_refusals(server):
        if not isinstance(payload, dict):
            raise bad_request("request body must be a JSON object", code=codes.INVALID_JSON)
        refuse_unknown_fields(payload, fields)
    return payload


# ---------------------------------------------------------------------- embeddings


async def embeddings(server: ServerState, request: Request) -> Response:
    require_api_key(server, request)
    server.require_ready()
    with server.slots.hold(server.batcher.retry_after):
        return await _embeddings(server, request)


async def _embeddings(server: ServerState, request: Request) -> Response:
    s = server.settings
    payload = await read_json(server, request)
    with counted_refusals(server):
        req = parse_embedding_request(
            payload, default_task=server.default_task, default_multivector=s.is_multi_vector_embeddings,
            max_items=s.max_client_batch_size, known_tasks=server.known_tasks,
        )
    try:
        result = await embed_request(server, request, req)
    except ClientGone:
        return Response(status_code=499)
    answered = time.perf_counter()
    if sum(vector.size for vector in result.vectors) <= RENDER_INLINE_VALUES:  # cheaper than a hop to the pool
        body = render_embeddings(req, result)
    else:
        body = await asyncio.get_running_loop().run_in_executor(server.preparer.pool, render_embeddings, req, result)
    server.metrics.request_rendering.observe(time.perf_counter() - answered)
    return Response(body, media_type="application/json")


def render_embeddings(req: EmbeddingRequest, result: EmbeddingResult) -> bytes:
    data = []
    for i, (vector, row) in enumerate(zip(result.vectors, result.rows, strict=True)):
        entry: dict = {"object": "embedding", "index": i}
        if req.encoding_format == "base64":
            entry["embedding"] = base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
            if vector.ndim == 2:
                entry["shape"] = list(vector.shape)
        else:
            entry["embedding"] = vector.tolist()
        if row.prepared.truncated:
            entry["truncated"] = True
        data.append(entry)
    tokens = result.tokens
    return json.dumps({
        "object": "list",
        "data": data,
        "model": req.model_label,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, separators=(",", ":"), allow_nan=False).encode()  # a last guard: a 500 with a request id, never NaN in JSON


# ---------------------------------------------------------------------- the other routes


def build_routes(server: ServerState) -> list[Route]:
    settings = server.settings

    async def embeddings_route(request: Request) -> Response:
        return await embeddings(server, request)

    async def models(request: Request) -> JSONResponse:
        require_api_key(server, request)
        primary = settings.primary_model_name
        # Nova extension fields on the served model: what a client needs to pick `dimensions` and parse rows.
        config = server.model.config if server.ready else None
        shape = ({"matryoshka_dims": list(config.matryoshka_dims), "multi_vector_dim": config.multi_vector_projector_dim,
                  "task_routing": config.task_routing} if config is not None else {})
        data = [{"id": name, "object": "model", "created": server.created, "owned_by": "nova",
                 "root": primary, "parent": None, **shape} for name in settings.model_names()]
        if server.ready:
            for name in server.gate.ready_names():
                if name not in settings.model_names():
                    data.append({"id": name, "object": "model", "created": server.created, "owned_by": "nova",
                                 "root": name, "parent": primary})
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> JSONResponse:
        server.require_ready()
        return JSONResponse({"status": "ok", "model": settings.primary_model_name,
                             "random_weights": bool(getattr(server.model.config, "nova_random_weights", False))})

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    async def openapi_doc(request: Request) -> JSONResponse:
        return JSONResponse(openapi.document(settings))

    return [
        Route("/v1/embeddings", embeddings_route, methods=["POST"]),
        Route("/embeddings", embeddings_route, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_doc, methods=["GET"]),
        *rerank_routes(server, require_api_key=require_api_key, read_json=read_json),
        *tei_routes(server, require_api_key=require_api_key, read_json_object=read_json_object),
        *lora_routes(server, require_admin=lambda request: require_admin(server, request),
                     read_json=lambda request: read_json_object(server, request,
                                                                ADMIN_BODY_FIELDS[request.scope["route"].path])),
    ]


class RequestContextMiddleware:
    """Pure ASGI: request id (X-Request-Id in and out), access log, per-route metrics."""

    def __init__(self, app, server: ServerState):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        if not incoming or len(incoming) > 128 or not all(c.isalnum() or c in "-_.:" for c in incoming):
            incoming = uuid.uuid4().hex
        # Each request runs in its own task, so the id never leaks to another request; it is left set
        # so that the error handlers outside this middleware still log it.
        request_id_var.set(incoming)
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", incoming.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            route = path if path in ROUTES else "other"
            method = scope.get("method", "")
            metrics = self.server.metrics
            metrics.requests.labels(route, method, str(status["code"])).inc()
            metrics.request_latency.labels(route).observe(elapsed)
            if route not in ("/health", "/metrics"):
                access_log.info('%s "%s %s" %d %.1fms', _client(scope), method, path, status["code"], elapsed * 1000)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
