"""A parsed request -> prepared rows: adapters routed by the model's one resolver, image URLs fetched under the
server's policy (async, on the event loop), then images decoded and items tokenized in a worker pool (never on
the model thread; on the event loop only for a request of a few short texts, which tokenizes in well under a
millisecond, less than the hop to the pool costs)."""

from __future__ import annotations

import asyncio
import os

from . import error_codes as codes
from .admission import adapter_not_found
from .config import Settings
from .errors import ApiError, from_item_error
from .images import ImageError, ImageFetcher, classify_source, decode_image
from .openmp import helper_pool
from .rows import EmbeddingRow
from .schemas import ITEM_KEYS, EmbeddingRequest

# A request whose items are texts of at most this many characters in all (instructions included) is tokenized
# on the event loop: a 15-word query tokenizes in tens of microseconds, where the hop to the worker pool and
# back costs several times that in a lone request's latency.
PREPARE_INLINE_CHARS = 1000
TEXT_ITEM_KEYS = ITEM_KEYS - {"image", "image_embeds", "image_grid_thw"}


class Preparer:
    def __init__(self, settings: Settings, fetcher: ImageFetcher):
        self.settings = settings
        self.fetcher = fetcher
        workers = settings.preprocess_workers or min(4, os.cpu_count() or 1)
        # per-request torch work stays on each worker thread (serve/openmp.py): with the thread engine, a team
        # here would slow the forwards in this same process
        self.pool = helper_pool("nova-prep", workers)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def resolve_routes(self, model, req: EmbeddingRequest, model_adapter: str | None, gate) -> list:
        """Every item's route (task, prompt, adapter: the model's one resolver), checked against the gate before
        any work. The `model` field may name an adapter (OpenAI clients) for items that name none. The routes
        are handed to `prepare`, so an item's adapter is resolved once."""
        routes = []
        for i, item in enumerate(req.items):
            if model_adapter is not None and "adapter" not in item:
                item = {**item, "adapter": model_adapter}
            try:
                route = model.processor.resolve_item(item, index=i, prompt_set=req.prompt_set)
            except ValueError as exc:
                raise from_item_error(exc) from None
            if route.adapter is not None and not gate.ready(route.adapter):
                where = f"input[{i}].adapter" if "adapter" in item else f"input[{i}].task"
                raise adapter_not_found(route.adapter, gate.ready_names(), param=where)
            routes.append(route)
        return routes

    async def fetch_images(self, req: EmbeddingRequest) -> dict[int, bytes]:
        images: dict[int, bytes] = {}
        for i, item in enumerate(req.items):
            if "image" not in item:
                continue
            try:
                kind, value = classify_source(item["image"])
                images[i] = await self.fetcher.fetch(value) if kind == "url" else value
            except ImageError as exc:
                raise ApiError(exc.status, f"item {i}: {exc}", param=f"input[{i}].image", code=exc.code) from None
        return images

    async def prepare(self, model, req: EmbeddingRequest, routes: list, images: dict[int, bytes]) -> list[EmbeddingRow]:
        """The request's rows, in its order: images decoded, items tokenized (`routes`: `resolve_routes`)."""
        if not images and _text_chars(req) <= PREPARE_INLINE_CHARS:
            return self._prepare_all(model, req, routes, images)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._prepare_all, model, req, routes, images)

    def _prepare_all(self, model, req: EmbeddingRequest, routes: list, images: dict[int, bytes]) -> list[EmbeddingRow]:
        """Worker thread: decode images and tokenize every item."""
        s = self.settings
        processor = model.processor
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
                          allow_paths=False, route=routes[i])
            try:
                prepared = processor.prepare_item(item, max_length=None, truncate=False, **kwargs)
                if prepared.num_tokens > s.max_input_tokens:
                    if not truncate:
                        raise ApiError(
                            413, f"item {i}: {prepared.num_tokens} tokens, over the limit of {s.max_input_tokens} "
                            "(--max-input-tokens; send \"truncate\": true or start with --auto-truncate)",
                            param=f"input[{i}]", code=codes.INPUT_TOO_LONG,
                        )
                    prepared = processor.prepare_item(item, max_length=s.max_input_tokens, truncate=True, **kwargs)
            except ValueError as exc:
                raise from_item_error(exc) from None
            rows.append(EmbeddingRow.of(prepared, multivector=req.return_multivector, dimensions=req.dimensions))
        return rows


def _text_chars(req: EmbeddingRequest) -> float:
    """Characters a request asks to tokenize; infinite when an item is anything but text (images, precomputed
    embeddings: their preparation is not bounded by a character count)."""
    total = len(req.instructions or "")
    for item in req.items:
        if not TEXT_ITEM_KEYS.issuperset(item):
            return float("inf")
        total += len(item.get("text") or "") + len(item.get("instructions") or "")
    return total
