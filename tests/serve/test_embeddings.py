"""POST /v1/embeddings against a real uvicorn: the official openai client, the three request forms, a
mixed request, multi-vector output, and 60 concurrent clients getting what they would get alone."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import assert_close, assert_error, b64_png, data_url, decode_embedding, reference

NAME = "nova-test"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(served_model_name=[NAME, "nova-alias"], max_wait_ms=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, payload, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=payload, timeout=60, **kwargs)


# ------------------------------------------------------------------------------------ OpenAI client


def test_openai_client_base64_default_matches_encode(client, tiny_model):
    texts = ["the quick brown fox", "embedding servers batch requests", "x"]
    result = client.embeddings.create(model=NAME, input=texts)  # the SDK asks for base64 by default
    assert result.model == NAME
    assert [d.index for d in result.data] == [0, 1, 2]
    for text, entry in zip(texts, result.data, strict=True):
        assert_close(np.asarray(entry.embedding, dtype=np.float32), reference(tiny_model, {"task": "retrieval", "text": text}))
    want_tokens = sum(tiny_model.processor.prepare_item(t).num_tokens for t in texts)
    assert result.usage.prompt_tokens == want_tokens == result.usage.total_tokens


def test_openai_client_float_dimensions_and_alias(client, tiny_model):
    result = client.embeddings.create(model="nova-alias", input="hello world", encoding_format="float", dimensions=32)
    assert result.model == "nova-alias"
    got = np.asarray(result.data[0].embedding, dtype=np.float32)
    assert got.shape == (32,)
    assert_close(got, reference(tiny_model, {"task": "retrieval", "text": "hello world"}, dimensions=32))


def test_openai_client_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert info.value.body["code"] == "model_not_found"
    assert client.embeddings.create(model=NAME, input="hi").data  # and it answers normally afterwards


def test_openai_client_models_list(client, tiny_model):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[:2] == [NAME, "nova-alias"]
    assert {"retrieval", "text-matching", "code"} <= set(ids)  # adapters are listed with parent=model
    served = models[0].model_dump()
    assert served["matryoshka_dims"] == tiny_model.config.matryoshka_dims and served["multi_vector_dim"] == 128


def test_openai_client_model_field_selects_adapter(client, tiny_model):
    got = client.embeddings.create(model="code", input="def add(a, b): return a + b").data[0].embedding
    want = reference(tiny_model, {"task": "retrieval", "adapter": "code", "text": "def add(a, b): return a + b"})
    assert_close(np.asarray(got, dtype=np.float32), want)


# ------------------------------------------------------------------------------------ request forms


def test_jina_form(server, tiny_model):
    payload = {"model": NAME, "task": "retrieval.passage", "dimensions": 32,
               "input": [{"text": "a passage about cats"}, {"image": b64_png(seed=3)}]}
    response = post(server, payload)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    for raw, entry in zip(payload["input"], data, strict=True):
        want = reference(tiny_model, {"task": "retrieval.passage", **raw}, dimensions=32)
        assert_close(decode_embedding(entry), want)


def test_jina_form_plain_strings_take_request_task(server, tiny_model):
    response = post(server, {"task": "code.query", "input": ["sort a list in python"], "embedding_type": "base64"})
    assert response.status_code == 200, response.text
    assert_close(decode_embedding(response.json()["data"][0]),
                 reference(tiny_model, {"task": "code.query", "text": "sort a list in python"}))


def test_mixed_nova_request_matches_each_item_alone(server, tiny_model):
    instructions = "Retrieve documents that answer the question"
    items = [
        "plain openai string",
        {"text": "how do I sort a list", "task": "retrieval.query"},
        {"image": data_url(seed=1), "task": "retrieval.passage"},
        {"text": "a photo of noise", "image": b64_png(seed=2, width=80, height=56), "task": "retrieval.passage",
         "instructions": "Find pictures of static"},
        {"text": "def f(x):\n    return sorted(x)", "task": "code.passage"},
        {"text": "the same sentence", "task": "text-matching", "adapter": "none"},
        {"text": "routed to another adapter", "task": "retrieval.query", "adapter": "text-matching",
         "instructions": None},
    ]
    for fmt in ("float", "base64"):
        response = post(server, {"model": NAME, "input": items, "instructions": instructions, "encoding_format": fmt})
        assert response.status_code == 200, response.text
        body = response.json()
        assert [d["index"] for d in body["data"]] == list(range(len(items)))
        for item, entry in zip(items, body["data"], strict=True):
            ref_item = {"task": "retrieval", "text": item} if isinstance(item, str) else item
            assert_close(decode_embedding(entry), reference(tiny_model, ref_item, instructions=instructions))
        want_tokens = 0
        for item in items:
            ref_item = {"task": "retrieval", "text": item} if isinstance(item, str) else dict(item)
            if "image" in ref_item:
                ref_item["image"] = ref_item["image"].split(",", 1)[-1]
            want_tokens += tiny_model.processor.prepare_item(ref_item, instructions=instructions).num_tokens
        assert body["usage"]["prompt_tokens"] == want_tokens


def test_multivector_float_and_base64(server, tiny_model):
    items = [{"text": "multi vector please", "task": "retrieval.query"}, {"image": b64_png(seed=5)}]
    float_resp = post(server, {"input": items, "return_multivector": True, "instructions": "Find it"})
    b64_resp = post(server, {"input": items, "return_multivector": True, "instructions": "Find it",
                             "encoding_format": "base64"})
    assert float_resp.status_code == b64_resp.status_code == 200, (float_resp.text, b64_resp.text)
    for i, item in enumerate(items):
        want = reference(tiny_model, {"task": "retrieval", **item}, instructions="Find it", multivector=True)
        as_float = float_resp.json()["data"][i]
        assert np.asarray(as_float["embedding"]).shape == (want.shape[0], 128)
        assert_close(decode_embedding(as_float), want)
        as_b64 = b64_resp.json()["data"][i]
        assert as_b64["shape"] == [want.shape[0], 128]
        assert_close(decode_embedding(as_b64), want)


def test_multivector_through_openai_client(client, tiny_model):
    result = client.embeddings.create(model=NAME, input="tokens please", extra_body={"return_multivector": True})
    want = reference(tiny_model, {"task": "retrieval", "text": "tokens please"}, multivector=True)
    assert_close(np.asarray(result.data[0].embedding, dtype=np.float32).reshape(-1, 128), want)


def test_auto_truncate_per_request(server, tiny_model):
    long_text = "word " * 10_000
    response = post(server, {"input": [long_text], "truncate": True})
    assert response.status_code == 200, response.text
    entry = response.json()["data"][0]
    assert entry.get("truncated") is True
    limit = server.settings.max_input_tokens
    assert limit - 8 <= response.json()["usage"]["prompt_tokens"] <= limit
    assert_error(post(server, {"input": ["ok", long_text]}), 413, "input_too_long", "input[1]")


def test_image_urls_refused_by_default(server):
    response = post(server, {"input": [{"image": "https://example.com/cat.png"}]})
    assert_error(response, 400, "image_url_refused", "input[0].image")


# ------------------------------------------------------------------------------------ concurrency


def test_sixty_concurrent_clients_get_what_they_would_get_alone(server, tiny_model):
    tasks = ["retrieval.query", "retrieval.passage", "text-matching", "code.query", "code.passage"]
    adapters = [None, None, "none", "code", "text-matching"]
    jobs = []
    for i in range(60):
        item: dict = {"task": tasks[i % 5], "text": f"client {i} says " + "hello " * (i % 13)}
        if adapters[(i // 5) % 5] is not None:
            item["adapter"] = adapters[(i // 5) % 5]
        if i % 4 == 1:
            item["instructions"] = f"instruction variant {i % 3}"
        if i % 7 == 3:
            item = {"task": tasks[i % 5], "image": b64_png(seed=i, width=56 + (i % 3) * 28)}
        jobs.append((item, i % 2 == 0))
    batches_before = server.metric("nova_batch_rows_count")
    rows_before = server.metric("nova_batch_rows_sum")

    async def one(client: httpx.AsyncClient, item: dict, multi: bool):
        payload = {"model": NAME, "input": [item, {"task": "retrieval", "text": "shared tail"}],
                   "return_multivector": multi, "encoding_format": "base64"}
        response = await client.post("/v1/embeddings", json=payload)
        return response

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, item, multi) for item, multi in jobs))

    responses = asyncio.run(main())
    for (item, multi), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert_close(decode_embedding(data[0]), reference(tiny_model, item, multivector=multi))
        assert_close(decode_embedding(data[1]),
                     reference(tiny_model, {"task": "retrieval", "text": "shared tail"}, multivector=multi))
    batches = server.metric("nova_batch_rows_count") - batches_before
    rows = server.metric("nova_batch_rows_sum") - rows_before
    assert rows == 120
    assert batches < rows  # rows from different requests really shared forward passes


def test_image_embeds_item_matches_the_image_it_came_from(server, tiny_model):
    import torch

    image = b64_png(seed=21, width=84, height=56)
    row = tiny_model.processor.prepare_item({"image": image, "task": "retrieval.passage"})
    with torch.inference_mode():
        grid = row.image_grid_thw
        embeds = tiny_model.visual(row.pixel_values, grid_thw=grid).pooler_output
    item = {"image_embeds": embeds.tolist(), "image_grid_thw": grid[0].tolist(), "task": "retrieval.passage"}
    response = post(server, {"input": [item]})
    assert response.status_code == 200, response.text
    assert_close(decode_embedding(response.json()["data"][0]),
                 reference(tiny_model, {"image": image, "task": "retrieval.passage"}))


def test_operations_routes(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/embeddings" in doc["paths"]
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": NAME, "random_weights": True}
    response = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/health").headers["x-request-id"]) == 32  # generated when absent
    assert httpx.post(server.url + "/v1/embeddings", json={"input": []}).status_code == 400
    text = httpx.get(server.url + "/metrics").text
    for name in ["nova_http_requests_total", "nova_http_request_duration_seconds_bucket", "nova_queue_rows",
                 "nova_queue_tokens", "nova_batch_rows_bucket", "nova_batch_tokens_bucket",
                 "nova_adapter_rows_total", "nova_rejected_requests_total", "nova_items_total",
                 "nova_batch_duration_seconds_bucket", "nova_model_ready 1.0", "nova_adapters_loaded 3.0"]:
        assert name in text, name
    assert 'route="/v1/embeddings"' in text and 'status="200"' in text


def test_request_stages_and_batch_cost_in_metrics(server):
    """Each answered request is counted once in each stage histogram (preparation, inference, rendering); a
    refused one only where it stopped; the batcher's fitted cost terms are exported once it has a fit."""
    stages = ["nova_request_preparation_seconds_count", "nova_request_inference_seconds_count",
              "nova_request_rendering_seconds_count"]
    before = [server.metric(name) for name in stages]
    for text in ("one", "two", "three"):
        assert httpx.post(server.url + "/v1/embeddings", json={"input": text}).status_code == 200
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "x", "dimensions": 7}).status_code == 400
    after = [server.metric(name) for name in stages]
    assert [b - a for a, b in zip(before, after, strict=True)] == [3, 3, 3]
    assert server.metric("nova_request_inference_seconds_sum") > 0
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE nova_batch_cost_seconds gauge" in text
