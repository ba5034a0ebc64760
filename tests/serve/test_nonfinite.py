"""A float16 model over real HTTP: a row whose activations overflow float16 is an error for its own request only
(400, naming the item and the dtype), while the other requests that shared its forward get their vectors; the
same through `nova serve --dtype float16` (the model in its own process, the error crossing the pipe)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import assert_close, assert_error, decode_embedding

from nova.loading import load_model

LOUD = {"text": "an ordinary sentence", "adapter": "loud"}  # overflows float16: `float16_overflow_adapter`
MESSAGE = "item 1: the float16 forward gave a non-finite vector (adapter 'loud'); load the model in bfloat16 or float32"


@pytest.fixture(scope="module")
def fp16_model(tiny_dir, float16_overflow_adapter):
    model = load_model(tiny_dir, dtype=torch.float16)
    model.load_adapter("loud", str(float16_overflow_adapter / "adapter_model.safetensors"))
    return model


BATCH_METRICS = ("nova_batch_rows_count", "nova_batch_rows_sum", "nova_batch_requests_sum")


def reference(model, item) -> list:
    return model.encode([item])[0].numpy()


def test_bad_rows_never_fail_other_clients(start_server, fp16_model):
    """The bad row reaches the model in ONE forward with the other clients' rows (the server waits until the
    batch holds every row, and the batch metrics show it), overflows float16 inside the model, and fails its own
    request only: the others' vectors are bit for bit those of each item encoded alone."""
    good = {f"client {i}": [{"text": f"good client {i}", "task": task}]
            for i, task in enumerate(["retrieval.query", "code.query", "text-matching"])}
    good["base"] = [{"text": "the base model", "adapter": "none"}]
    requests = {**good, "bad": ["a fine first item", LOUD]}
    rows = sum(len(items) for items in requests.values())
    want = {key: reference(fp16_model, items[0]) for key, items in good.items()}
    # a batch leaves when it holds `rows` rows; the long wait only bounds a failure
    server = start_server(model=fp16_model, max_wait_ms=60_000, max_batch_size=rows, max_batch_tokens=100_000)
    try:
        before = {name: server.metric(name) for name in BATCH_METRICS}
        results: dict = {}
        together = threading.Barrier(len(requests))

        def send(key, items):
            together.wait()
            results[key] = httpx.post(server.url + "/v1/embeddings", json={"input": items, "encoding_format": "base64"},
                                      timeout=120)

        threads = [threading.Thread(target=send, args=item) for item in requests.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 10  # the batch metrics are recorded just after the answers go out
        while server.metric("nova_batch_rows_count") == before["nova_batch_rows_count"] and time.monotonic() < deadline:
            time.sleep(0.02)
        batches, batch_rows, batch_requests = (server.metric(name) - before[name] for name in BATCH_METRICS)
        assert (batches, batch_rows, batch_requests) == (1, rows, len(requests))  # one forward of every row
        for key in good:
            assert results[key].status_code == 200, results[key].text
            got = decode_embedding(results[key].json()["data"][0])
            assert np.array_equal(got, want[key]), (key, float(np.abs(got - want[key]).max()))
        error = assert_error(results["bad"], 400, "non_finite_embedding", "input[1]")
        assert error["message"] == MESSAGE
    finally:
        server.stop()


def test_nova_serve_dtype_float16(serve_process, tiny_dir, tmp_path, float16_overflow_adapter, fp16_model):
    """`nova serve --dtype float16`, the adapter named by its weights file as the model card names one."""
    proc = serve_process(tiny_dir, tmp_path, extra=["--dtype", "float16", "--load-lora",
                                                    f"loud={float16_overflow_adapter / 'adapter_model.safetensors'}"])
    try:
        item = {"text": "a query in float16", "task": "retrieval.query"}
        assert_close(proc.embed([item])[0], reference(fp16_model, item))
        bad = httpx.post(proc.url + "/v1/embeddings", json={"input": [item, LOUD]}, timeout=60)
        assert assert_error(bad, 400, "non_finite_embedding", "input[1]")["message"] == MESSAGE
        assert_close(proc.embed([item])[0], reference(fp16_model, item))
    finally:
        proc.stop()
