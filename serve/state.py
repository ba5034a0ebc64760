"""The server's shared state and its life cycle: load the model (in a thread, `/health` is 503 meanwhile), load
`--load-lora` adapters, warm up, start and stop the batcher and the dispatcher.

A request's path, top-down: routes.py (auth, body, parse, render) -> schemas.py (three request forms -> one
`EmbeddingRequest`) -> pipeline.py (the request's rows, admission, the queue, its vectors): preparation.py
(adapters resolved, images fetched, items tokenized into `EmbeddingRow`s, rows.py) -> admission.py (slots,
adapter gate) -> batcher.py (queue, batch forming) -> dispatcher.py -> engine/ (collate, forward: in the model's
own process, or on threads of this one).
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import error_codes as codes
from .admission import AdapterGate, RequestSlots, SharedLimits, Tally
from .batcher import Batcher
from .config import Settings
from .dispatcher import Dispatcher
from .engine import (
    EngineLink,
    EngineNotices,
    ModelLoadFailed,
    ProcessEngine,
    ServedModel,
    ThreadEngine,
    load_model_for,
    prepare_for_serving,
)
from .errors import ApiError
from .images import ImageFetcher, ImagePolicy
from .metrics import Metrics
from .openmp import run_single_threaded
from .preparation import Preparer

log = logging.getLogger("serve")


class ServerState:
    """Everything the routes share: settings, model, metrics, admission, batcher, dispatcher, image fetcher."""

    def __init__(self, settings: Settings, model=None, *, engine_link: EngineLink | None = None,
                 shared_limits: SharedLimits | None = None):
        self.settings = settings
        self.engine_link = engine_link  # one HTTP worker of several: the model process is the supervisor's
        self.shared_limits = shared_limits
        self.model: ServedModel | None = model  # the model itself (thread engine) or its RemoteModel
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.failure_code = codes.MODEL_LOAD_FAILED
        self._starting_engine: ProcessEngine | None = None
        self._shutting_down = False
        self.gate = AdapterGate()
        self.slots = RequestSlots(settings.max_concurrent_requests, self.metrics,
                                  Tally(shared_limits.requests) if shared_limits else None)
        self.fetcher = ImageFetcher(ImagePolicy(
            allow_urls=settings.allow_image_urls, allowlist=list(settings.image_url_allowlist),
            max_bytes=settings.max_image_bytes, timeout=settings.image_url_timeout,
            max_pixels=settings.max_image_pixels,
        ))
        self.preparer: Preparer | None = None
        self.dispatcher = Dispatcher()
        self.batcher: Batcher | None = None
        self.known_tasks: frozenset[str] | None = None
        self.default_task = settings.default_task
        self.created = int(time.time())
        self.on_load_failed = None  # set by the CLI to stop the process

    @property
    def fetcher(self) -> ImageFetcher:
        return self._fetcher

    @fetcher.setter
    def fetcher(self, fetcher: ImageFetcher) -> None:  # tests swap in a fetcher with a pinned resolver
        self._fetcher = fetcher
        if getattr(self, "preparer", None) is not None:
            self.preparer.fetcher = fetcher

    # ------------------------------------------------------------------ lifecycle

    def _finish_setup_sync(self) -> None:
        """Worker thread, for a model object in this process: prefix cache, --load-lora adapters, warm-up."""
        prepare_for_serving(self.model, self.settings)

    def _load_in_process_sync(self):
        """Worker thread: the model object this process runs (loaded here unless one was handed over)."""
        if self.model is None:
            log.info("loading model %s", self.settings.model or "(bundled tiny checkpoint)")
            self.model = load_model_for(self.settings)
        self._finish_setup_sync()
        return self.model

    async def startup(self) -> None:
        s = self.settings
        self.preparer = Preparer(s, self.fetcher)
        self.batcher = Batcher(
            self.dispatcher, max_batch_tokens=s.max_batch_tokens, max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms, max_queue_tokens=s.max_queue_tokens, metrics=self.metrics,
            on_row_done=lambda row: self.gate.release(row.adapter),
            queued=Tally(self.shared_limits.queue_tokens) if self.shared_limits else None,
        )
        self.batcher.start()
        self._load_task = asyncio.create_task(self._load())

    def _failed(self, message: str, code: str = codes.MODEL_LOAD_FAILED) -> None:
        """The server cannot serve any more: /health and every request answer 503, and the CLI exits."""
        self.load_error = message if code != codes.MODEL_LOAD_FAILED else f"the model failed to load: {message}"
        self.failure_code = code
        if self.on_load_failed is not None:
            self.on_load_failed(self.load_error)  # the CLI ends with this one line
        else:
            log.error("%s", self.load_error)

    async def _load(self) -> None:
        try:
            if self.settings.engine_kind(model_given=self.model is not None) == "process":
                log.info("loading model %s in its own process", self.settings.model or "(bundled tiny checkpoint)")
                engine = self._starting_engine = ProcessEngine(self.settings, self.engine_link)
                engine.on_exit = lambda message: self._failed(message, code=codes.MODEL_PROCESS_EXITED)
                engine.notices = OtherWorkersAdapters(self)
                model = await engine.start()
            else:
                model = await asyncio.to_thread(run_single_threaded, self._load_in_process_sync)
                engine = ThreadEngine(model, self.settings.torch_threads)
        except Exception as exc:
            if self._shutting_down:
                return
            log.debug("model failed to load", exc_info=True)  # the message says what to fix; --log-level debug
            self._failed(str(exc) if isinstance(exc, ModelLoadFailed) else f"{exc.__class__.__name__}: {exc}")
            return
        self.model = model
        self.dispatcher.engine = engine
        self.metrics.watch_prefix_cache(engine.prefix_cache_stats)
        self.gate = AdapterGate(list(model.list_adapters()))
        self.known_tasks = frozenset(model.config.task_routing)
        if self.default_task is None:
            self.default_task = model.config.default_task
        if self.default_task not in self.known_tasks:
            self._failed(f"--default-task {self.default_task!r} is not a task of this model; its tasks: "
                         f"{', '.join(sorted(self.known_tasks))}", code=codes.INVALID_DEFAULT_TASK)
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
        self._shutting_down = True
        if self.dispatcher.engine is None and self._starting_engine is not None:
            await self._starting_engine.stop()  # still loading: nothing to drain
        if hasattr(self, "_load_task") and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.stop()
        await self.dispatcher.stop()
        await self.fetcher.aclose()
        if self.preparer is not None:
            self.preparer.close()

    # ------------------------------------------------------------------ shared checks

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(503, self.load_error, code=self.failure_code)
        if not self.ready:
            raise ApiError(503, "the model is loading; retry shortly", code=codes.MODEL_LOADING,
                           headers={"Retry-After": "2"})

    def resolve_model_name(self, name: str | None) -> str | None:
        """-> the adapter that `model` selects (None: the served model itself); 404 for unknown names."""
        names = self.settings.model_names()
        if name is None or name in names:
            return None
        if self.gate.ready(name):
            return name
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(names)}",
                       param="model", code=codes.MODEL_NOT_FOUND)


class OtherWorkersAdapters(EngineNotices):
    """What this HTTP worker does when another worker of the same server changes the model's adapters: route
    the new list (the engine sends it after every load and unload), and drain an adapter another worker is
    unloading before the engine unloads it."""

    def __init__(self, server: ServerState):
        self.server = server
        self.draining_for_others: set[str] = set()

    def adapters_changed(self, adapters: dict[str, dict]) -> None:
        gate = self.server.gate
        for name in adapters:
            if name not in gate.state or name in self.draining_for_others:
                gate.state[name] = "ready"  # loaded elsewhere, or its unload elsewhere failed
        for name, state in list(gate.state.items()):
            if name not in adapters and (state == "ready" or name in self.draining_for_others):
                del gate.state[name]  # unloaded elsewhere (this worker's own load or unload keeps its state)
        self.draining_for_others.intersection_update(adapters)
        self.server.metrics.adapters_loaded.set(len(adapters))

    async def drain(self, name: str, timeout: float) -> bool:
        if not self.server.gate.ready(name):
            return True  # not routed here (not loaded yet, or this worker is unloading it itself)
        self.draining_for_others.add(name)
        return await self.server.gate.drain(name, timeout)
