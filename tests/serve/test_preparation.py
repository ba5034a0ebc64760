"""Where a request's items are prepared: a few short texts on the event loop (cheaper than the hop), anything
else (long text, images) in the worker pool, so a heavy request never stalls the loop."""

import asyncio
import threading

from serve.config import Settings
from serve.preparation import PREPARE_INLINE_CHARS, Preparer
from serve.schemas import EmbeddingRequest


def prepared_on(model, items, image_bytes=None) -> str:
    """The name of the thread that tokenized `items`."""
    preparer = Preparer(Settings(), fetcher=None)
    threads = []
    original = model.processor.prepare_item

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    model.processor.prepare_item = recording
    try:
        req = EmbeddingRequest(model=None, items=items)
        routes = [model.processor.resolve_item(item) for item in items]
        asyncio.run(preparer.prepare(model, req, routes, image_bytes or {}))
    finally:
        del model.processor.prepare_item
        preparer.close()
    assert len(set(threads)) == 1
    return threads[0]


def test_short_texts_are_prepared_on_the_loop_long_ones_and_images_in_the_pool(fresh_model, make_image):
    import io

    loop_thread = threading.current_thread().name  # asyncio.run runs the loop on this thread
    short = [{"text": "a short query", "task": "retrieval.query", "instructions": "Find passages"}] * 3
    assert prepared_on(fresh_model, short) == loop_thread
    long = [{"text": "word " * (PREPARE_INLINE_CHARS // 5 + 1), "task": "retrieval.query"}]
    assert prepared_on(fresh_model, long).startswith("nova-prep")
    png = io.BytesIO()
    make_image(32, 32).save(png, format="PNG")
    assert prepared_on(fresh_model, [{"image": "x", "task": "retrieval.passage"}],
                       {0: png.getvalue()}).startswith("nova-prep")
