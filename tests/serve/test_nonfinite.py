"""A float16 model over real HTTP: a row whose activations overflow float16 is an error for its own request only
(400, naming the item and the dtype), while the other requests that shared its forward get their vectors; the
same through `nova serve --dtype float16` (the model in its own process, the error crossing the pipe)."""

from __future__ import annotations

import threading

import httpx
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


def reference(model, item) -> list:
    return model.encode([item])[0].numpy()


def test_an_overflowing_row_fails_its_own_request_only(start_server, fp16_model):
    good = {f"client {i}": [{"text": f"good client {i}", "task": task}]
            for i, task in enumerate(["retrieval.query", "code.query", "text-matching"])}
    good["base"] = [{"text": "the base model", "adapter": "none"}]
    want = {key: reference(fp16_model, items[0]) for key, items in good.items()}
    server = start_server(model=fp16_model, max_wait_ms=400, max_batch_tokens=100_000, max_batch_size=1000)
    try:
        results: dict = {}

        def send(key, items):
            results[key] = httpx.post(server.url + "/v1/embeddings", json={"input": items}, timeout=60)

        requests = {**good, "bad": ["a fine first item", LOUD]}
        threads = [threading.Thread(target=send, args=item) for item in requests.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # the bad request shared a forward with others: some batch held more than one request
        assert server.metric("nova_batch_requests_sum") > server.metric("nova_batch_requests_count")
        for key in good:
            assert results[key].status_code == 200, results[key].text
            assert_close(decode_embedding(results[key].json()["data"][0]), want[key])
        error = assert_error(results["bad"], 400, "non_finite_embedding", "input[1]")
        assert error["message"] == MESSAGE
        after = httpx.post(server.url + "/v1/embeddings", json={"input": good["base"]}, timeout=60)
        assert after.status_code == 200, after.text
        assert_close(decode_embedding(after.json()["data"][0]), want["base"])
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
