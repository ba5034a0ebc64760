"""The Starlette application: `create_app(settings, model=None)`.

With `model=None` the app answers at once and loads the model in a background thread (`/health` is 503
until it is ready); with a model object it is ready as soon as the lifespan starts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import openapi
from .batcher import Batcher
from .config import Settings
from .errors import (
    ApiError,
    api_error_handler,
    bad_request,
    from_value_error,
    http_exception_handler,
    request_id_var,
    unhandled_exception_handler,
)
from .images import ImageError, ImageFetcher, ImagePolicy, classify_source, decode_image
from .lora_admin import AdapterGate, adapter_not_found, lora_routes, peft_folder
from .metrics import Metrics
from .schemas import EmbeddingRequest, parse_embedding_request

log = logging.getLogger("serve")
access_log = logging.getLogger("serve.access")

ROUTES = (
    "/v1/embeddings", "/embeddings", "/v1/models", "/health", "/metrics", "/openapi.json",
    "/v1/internal/lora", "/v1/internal/lora/load", "/v1/internal/lora/unload",
)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (the id of the request being handled, or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


class ServerState:
    """Everything the routes share: settings, model, batcher, adapter gate, metrics, image fetcher."""

    def __init__(self, settings: Settings, model=None):
        self.settings = settings
        self.model = model
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.gate = AdapterGate()
        self.batcher: Batcher | None = None
        self.inflight = 0
        workers = settings.preprocess_workers or min(4, os.cpu_count() or 1)
        self.prep_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nova-prep")
        self.fetcher = ImageFetcher(ImagePolicy(
            allow_urls=settings.allow_image_urls, allowlist=list(settings.image_url_allowlist),
            max_bytes=settings.max_image_bytes, timeout=settings.image_url_timeout,
            max_pixels=settings.max_image_pixels,
        ))
        self.known_tasks: frozenset[str] | None = None
        self.default_task = settings.default_task
        self.created = int(time.time())
        self.on_load_failed = None  # set by the CLI to stop the process

    # ------------------------------------------------------------------ lifecycle

    def _load_model_sync(self):
        from nova.loading import load_model

        s = self.settings
        device = None if s.device == "auto" else s.device
        dtype = None
        if s.dtype != "auto":
            import torch

            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[s.dtype]
        trust = True if s.model is None else s.trust_remote_code
        return load_model(s.model, device=device, dtype=dtype, chat_template=s.chat_template,
                          max_loras=s.max_loras, max_lora_rank=s.max_lora_rank, trust_remote_code=trust)

    def _finish_setup_sync(self) -> None:
        """Runs in a worker thread once a model object exists: --load-lora adapters and a warm-up forward."""
        model = self.model
        model.prefix_cache.configure(self.settings.prefix_cache_mb << 20)
        self.metrics.watch_prefix_cache(model.prefix_cache.stats)
        for name, path in self.settings.load_lora:
            folder = os.path.realpath(peft_folder(path))
            resident = model.list_adapters().get(name)
            if resident is not None:  # e.g. the model card's --load-lora retrieval=<the checkpoint's own folder>
                if os.path.realpath(str(resident.get("path"))) != folder:
                    raise ValueError(f"--load-lora {name}={path}: an adapter {name!r} is already loaded from "
                                     f"{resident.get('path')}; load this one under another name")
                log.info("adapter %r: already loaded from %s", name, folder)
                continue
            model.load_adapter(name, folder)
            log.info("adapter %r loaded from %s", name, path)
        row = model.processor.prepare_item("warm-up", index=0, allow_paths=False)
        model.embed_prepared([row], False)

    async def startup(self) -> None:
        self.batcher = Batcher(
            None, max_batch_tokens=self.settings.max_batch_tokens, max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.max_wait_ms, max_queue_tokens=self.settings.max_queue_tokens,
            metrics=self.metrics, on_row_done=lambda row: self.gate.release(row.adapter),
        )
        self.batcher.start()
        self._load_task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            if self.model is None:
                log.info("loading model %s", self.settings.model or "(bundled tiny checkpoint)")
                self.model = await asyncio.to_thread(self._load_model_sync)
            await asyncio.to_thread(self._finish_setup_sync)
        except Exception as exc:
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            log.exception("model failed to load")
            if self.on_load_failed is not None:
                self.on_load_failed(self.load_error)
            return
        model = self.model
        self.batcher.model = model
        self.gate = AdapterGate(list(model.list_adapters()))
        self.batcher.on_row_done = lambda row: self.gate.release(row.adapter)
        self.known_tasks = frozenset(model.config.task_routing)
        if self.default_task is None:
            self.default_task = model.config.default_task
        if self.default_task not in self.known_tasks:
            self.load_error = f"--default-task {self.default_task!r} is not a task of this model"
            log.error(self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed(self.load_error)
            return
        self.metrics.adapters_loaded.set(len(model.list_adapters()))
        self.metrics.model_ready.set(1)
        self.ready = True
        if getattr(model.config, "nova_random_weights", False):
            banner = "!" * 78
            log.warning("%s\n!!  THE MODEL HAS RANDOM WEIGHTS: its embeddings are meaningless (testing only)  !!\n%s",
                        banner, banner)
        log.info("model ready: %s (names: %s; adapters: %s)", self.settings.model or "tiny random-weight checkpoint",
                 ", ".join(self.settings.model_names()), ", ".join(model.list_adapters()) or "none")

    async def shutdown(self) -> None:
        if hasattr(self, "_load_task") and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        await self.fetcher.aclose()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ guards

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready:
            raise ApiError(503, "the model is loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization")
        if header is None:
            return request.headers.get("x-api-key")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    @staticmethod
    def _matches(token: str | None, keys: list[str]) -> bool:
        supplied = (token or "").encode()
        ok = False
        for key in keys:  # compare against every key, in constant time each
            ok |= hmac.compare_digest(supplied, key.encode())
        return ok and token is not None

    def require_api_key(self, request: Request) -> None:
        keys = list(self.settings.api_keys)
        if not keys:
            return
        if self.settings.admin_api_key:
            keys.append(self.settings.admin_api_key)
        if not self._matches(self._bearer(request), keys):
            self.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def require_admin(self, request: Request) -> None:
        key = self.settings.admin_api_key
        if not key:
            raise ApiError(403, "admin routes need the server to be started with --admin-api-key",
                           code="admin_disabled")
        if not self._matches(self._bearer(request), [key]):
            self.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(401, "invalid or missing admin API key", code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.payload_limit
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.metrics.rejected.labels("payload_too_large").inc()
            raise ApiError(413, f"payload of {length} bytes is over the limit of {limit} bytes (--payload-limit)",
                           code="payload_too_large")
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    self.metrics.rejected.labels("payload_too_large").inc()
                    raise ApiError(413, f"payload is over the limit of {limit} bytes (--payload-limit)",
                                   code="payload_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            self.metrics.rejected.labels("client_disconnected").inc()
            raise ApiError(400, "the client disconnected while sending the body", code="client_disconnected") \
                from None
        return b"".join(chunks)

    # ------------------------------------------------------------------ embeddings

    def resolve_model_name(self, name: str | None) -> str | None:
        """-> the adapter that `model` selects (None: the served model itself); 404 for unknown names."""
        names = self.settings.model_names()
        if name is None or name in names:
            return None
        if self.gate.ready(name):
            return name
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(names)}",
                       param="model", code="model_not_found")

    def _effective_adapter(self, item: dict, i: int) -> str | None:
        """The adapter an item runs on, by the model's own routing rule (one rule for every caller)."""
        try:
            return self.model.processor.resolve_item(item, index=i).adapter
        except ValueError as exc:
            raise from_value_error(exc) from None

    def _prepare_all(self, req: EmbeddingRequest, images: dict[int, bytes]) -> list:
        """Worker thread: decode images and tokenize every item (CPU work kept off the event loop)."""
        s = self.settings
        processor = self.model.processor
        truncate = s.auto_truncate if req.truncate is None else req.truncate
        rows = []
        for i, item in enumerate(req.items):
            item = dict(item)
            if i in images:
                try:
                    item["image"] = decode_image(images[i], max_pixels=s.max_image_pixels,
                                                 max_bytes=s.max_image_bytes)
                except ImageError as exc:
                    raise ApiError(exc.status, f"item {i}: {exc}", param=f"input[{i}].image", code=exc.code) \
                        from None
            kwargs = dict(index=i, instructions=req.instructions, max_pixels=s.resize_max_pixels,
                          allow_paths=False, prompt_set=req.prompt_set)
            try:
                row = processor.prepare_item(item, max_length=None, truncate=False, **kwargs)
                if row.num_tokens > s.max_input_tokens:
                    if not truncate:
                        raise ApiError(
                            413, f"item {i}: {row.num_tokens} tokens, over the limit of {s.max_input_tokens} "
                            "(--max-input-tokens; send \"truncate\": true or start with --auto-truncate)",
                            param=f"input[{i}]", code="input_too_long",
                        )
                    row = processor.prepare_item(item, max_length=s.max_input_tokens, truncate=True, **kwargs)
            except ValueError as exc:
                raise from_value_error(exc) from None
            rows.append(row)
        return rows

    async def embed(self, request: Request) -> Response:
        self.require_api_key(request)
        self.require_ready()
        s = self.settings
        if self.inflight >= s.max_concurrent_requests:
            self.metrics.rejected.labels("too_many_requests").inc()
            raise ApiError(429, f"too many concurrent requests (limit {s.max_concurrent_requests})",
                           code="too_many_requests", headers={"Retry-After": str(self.batcher.retry_after())})
        self.inflight += 1
        self.metrics.inflight_requests.set(self.inflight)
        try:
            return await self._embed(request)
        finally:
            self.inflight -= 1
            self.metrics.inflight_requests.set(self.inflight)

    async def _embed(self, request: Request) -> Response:
        s = self.settings
        body = await self.read_body(request)
        try:
            payload = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            self.metrics.rejected.labels("invalid_json").inc()
            raise bad_request("request body is not valid JSON", code="invalid_json") from None
        try:
            req = parse_embedding_request(
                payload, default_task=self.default_task, default_multivector=s.is_multi_vector_embeddings,
                max_items=s.max_client_batch_size, known_tasks=self.known_tasks,
            )
            model_adapter = self.resolve_model_name(req.model)
            req.model_label = req.model or s.primary_model_name
            try:
                self.model.check_dimensions(req.dimensions, req.return_multivector)
            except ValueError as exc:
                raise bad_request(str(exc), param="dimensions") from None
            if req.prompt_set is not None and req.prompt_set not in self.model.config.prompt_sets:
                raise bad_request(f"unknown prompt_set {req.prompt_set!r}; known: "
                                  f"{sorted(self.model.config.prompt_sets)}", param="prompt_set")
            # adapters: the `model` field may name one (OpenAI clients); items may name their own
            for i, item in enumerate(req.items):
                if model_adapter is not None and "adapter" not in item:
                    item["adapter"] = model_adapter
                name = self._effective_adapter(item, i)
                if name is not None and not self.gate.ready(name):
                    where = f"input[{i}].adapter" if "adapter" in item else f"input[{i}].task"
                    raise adapter_not_found(name, self.gate.ready_names(), param=where)
            # image URLs are fetched here (async, policy-checked); decoding happens in the worker
            images: dict[int, bytes] = {}
            for i, item in enumerate(req.items):
                if "image" not in item:
                    continue
                try:
                    kind, value = classify_source(item["image"])
                    images[i] = await self.fetcher.fetch(value) if kind == "url" else value
                except ImageError as exc:
                    raise ApiError(exc.status, f"item {i}: {exc}", param=f"input[{i}].image", code=exc.code) \
                        from None
            loop = asyncio.get_running_loop()
            self.batcher.preparing_started(len(req.items))
            try:
                rows = await loop.run_in_executor(self.prep_pool, self._prepare_all, req, images)
            finally:
                self.batcher.preparing_done(len(req.items))
        except ApiError as exc:
            self.metrics.rejected.labels(exc.code or str(exc.status)).inc()
            raise

        # admission: adapters (drain-aware) then queue budget, atomically on the event loop
        adapters = [row.adapter for row in rows]
        try:
            self.gate.acquire(adapters)
        except ApiError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise
        try:
            ticket = self.batcher.submit([
                {"prepared": row, "tokens": row.num_tokens, "adapter": row.adapter,
                 "multivector": req.return_multivector,
                 "dimensions": None if req.return_multivector else req.dimensions}
                for row in rows
            ])
        except ApiError:
            for name in adapters:
                self.gate.release(name)
            raise
        for item in req.items:
            modality = "+".join(k for k in ("text", "image", "image_embeds") if k in item)
            self.metrics.items.labels(modality).inc()

        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({ticket.future, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if ticket.future not in done:
                dropped = self.batcher.cancel(ticket)
                log.info("client went away; dropped %d queued row(s)", dropped)
                self.metrics.rejected.labels("client_disconnected").inc()
                return Response(status_code=499)
            try:
                vectors = ticket.future.result()
            except ApiError:
                raise
            except ValueError as exc:
                raise from_value_error(exc) from None
        finally:
            disconnect.cancel()
        body = await loop.run_in_executor(self.prep_pool, _render, req, vectors, rows)
        return Response(body, media_type="application/json")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _render(req: EmbeddingRequest, vectors: list[np.ndarray], rows: list) -> bytes:
    data = []
    for i, vector in enumerate(vectors):
        entry: dict = {"object": "embedding", "index": i}
        if req.encoding_format == "base64":
            entry["embedding"] = base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()
            if vector.ndim == 2:
                entry["shape"] = list(vector.shape)
        else:
            entry["embedding"] = vector.tolist()
        if getattr(rows[i], "truncated", False):
            entry["truncated"] = True
        data.append(entry)
    tokens = sum(row.num_tokens for row in rows)
    return json.dumps({
        "object": "list",
        "data": data,
        "model": req.model_label,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, separators=(",", ":"), allow_nan=False).encode()  # a last guard: a 500 with a request id, never NaN in JSON


class RequestContextMiddleware:
    """Pure ASGI: request id (X-Request-Id in and out), access log, per-route metrics."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

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
            metrics = self.state.metrics
            metrics.requests.labels(route, method, str(status["code"])).inc()
            metrics.request_latency.labels(route).observe(elapsed)
            if route not in ("/health", "/metrics"):
                access_log.info('%s "%s %s" %d %.1fms', _client(scope), method, path, status["code"],
                                elapsed * 1000)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def create_app(settings: Settings, model=None) -> Starlette:
    settings.validate()
    state = ServerState(settings, model)

    async def embeddings(request: Request) -> Response:
        return await state.embed(request)

    async def models(request: Request) -> JSONResponse:
        state.require_api_key(request)
        primary = settings.primary_model_name
        # Nova extension fields on the served model: what a client needs to pick `dimensions` and parse rows.
        shape = ({"matryoshka_dims": list(state.model.config.matryoshka_dims),
                  "multi_vector_dim": state.model.config.multi_vector_projector_dim,
                  "task_routing": state.model.config.task_routing} if state.ready else {})
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "nova",
                 "root": primary, "parent": None, **shape} for name in settings.model_names()]
        if state.ready:
            for name in state.gate.ready_names():
                if name not in settings.model_names():
                    data.append({"id": name, "object": "model", "created": state.created, "owned_by": "nova",
                                 "root": name, "parent": primary})
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> JSONResponse:
        state.require_ready()
        return JSONResponse({"status": "ok", "model": settings.primary_model_name,
                             "random_weights": bool(getattr(state.model.config, "nova_random_weights", False))})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    async def openapi_doc(request: Request) -> JSONResponse:
        return JSONResponse(openapi.document(settings))

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_doc, methods=["GET"]),
        *lora_routes(state),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_exception_handler,
        },
    )
    app.add_middleware(RequestContextMiddleware, state=state)
    app.state.nova = state
    return app
