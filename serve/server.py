"""The server's parts and their life cycle: load the model (in a thread, `/health` is 503 meanwhile), load
`--load-lora` adapters, warm up, start and stop the batcher and backend.

A request's path, top-down: routes.py (auth, body, parse, render) -> schemas.py (three request forms -> items)
-> preparation.py (adapters routed, images fetched, items tokenized in a pool) -> admission.py (slots, adapter
gate) -> batcher.py (queue, batch forming) -> backend.py (collate, forward on the model thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from .adapters import peft_folder
from .admission import AdapterGate, RequestSlots
from .backend import Backend
from .batcher import Batcher
from .config import Settings
from .errors import ApiError
from .images import ImageFetcher, ImagePolicy
from .metrics import Metrics
from .preparation import Preparer

log = logging.getLogger("serve")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class Server:
    """Everything the routes share: settings, model, metrics, admission, batcher, backend, image fetcher."""

    def __init__(self, settings: Settings, model=None):
        self.settings = settings
        self.model = model
        self.metrics = Metrics()
        self.ready = False
        self.load_error: str | None = None
        self.gate = AdapterGate()
        self.slots = RequestSlots(settings.max_concurrent_requests, self.metrics)
        self.fetcher = ImageFetcher(ImagePolicy(
            allow_urls=settings.allow_image_urls, allowlist=list(settings.image_url_allowlist),
            max_bytes=settings.max_image_bytes, timeout=settings.image_url_timeout,
            max_pixels=settings.max_image_pixels,
        ))
        self.preparer: Preparer | None = None
        self.backend = Backend()
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

    def _load_model_sync(self):
        from nova.loading import load_model

        s = self.settings
        device = None if s.device == "auto" else s.device
        dtype = None
        if s.dtype != "auto":
            import torch

            dtype = getattr(torch, DTYPES[s.dtype])
        trust = True if s.model is None else s.trust_remote_code
        return load_model(s.model, device=device, dtype=dtype, chat_template=s.chat_template,
                          max_loras=s.max_loras, max_lora_rank=s.max_lora_rank, trust_remote_code=trust)

    def _finish_setup_sync(self) -> None:
        """Worker thread, once a model object exists: the prefix cache size, --load-lora adapters and a warm-up
        forward."""
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
        model.embed_prepared([row], False, collated=model.collate_rows([row]))

    async def startup(self) -> None:
        s = self.settings
        self.preparer = Preparer(s, self.fetcher)
        self.batcher = Batcher(
            self.backend, max_batch_tokens=s.max_batch_tokens, max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms, max_queue_tokens=s.max_queue_tokens, metrics=self.metrics,
            on_row_done=lambda row: self.gate.release(row.adapter),
        )
        self.batcher.start()
        self._load_task = asyncio.create_task(self._load())

    def _failed(self, message: str) -> None:
        self.load_error = message
        if self.on_load_failed is not None:
            self.on_load_failed(message)

    async def _load(self) -> None:
        try:
            if self.model is None:
                log.info("loading model %s", self.settings.model or "(bundled tiny checkpoint)")
                self.model = await asyncio.to_thread(self._load_model_sync)
            await asyncio.to_thread(self._finish_setup_sync)
        except Exception as exc:
            log.exception("model failed to load")
            self._failed(f"{exc.__class__.__name__}: {exc}")
            return
        model = self.model
        self.backend.model = model
        self.gate = AdapterGate(list(model.list_adapters()))
        self.known_tasks = frozenset(model.config.task_routing)
        if self.default_task is None:
            self.default_task = model.config.default_task
        if self.default_task not in self.known_tasks:
            log.error("--default-task %r is not a task of this model", self.default_task)
            self._failed(f"--default-task {self.default_task!r} is not a task of this model")
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
        await self.backend.stop()
        await self.fetcher.aclose()
        if self.preparer is not None:
            self.preparer.close()

    # ------------------------------------------------------------------ shared checks

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready:
            raise ApiError(503, "the model is loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "2"})

    def resolve_model_name(self, name: str | None) -> str | None:
        """-> the adapter that `model` selects (None: the served model itself); 404 for unknown names."""
        names = self.settings.model_names()
        if name is None or name in names:
            return None
        if self.gate.ready(name):
            return name
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(names)}",
                       param="model", code="model_not_found")
