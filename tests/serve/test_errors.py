"""Every error path answers its status in OpenAI's error shape, and the server answers normally afterwards.
Also: backpressure (429 + Retry-After), a disconnecting client frees its queued rows, requests refused before
batching never fail another client's rows, and no input yields a 500. (A bad row that reaches the model in one
forward with other clients' rows: test_nonfinite.py.)"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import assert_close, assert_error, decode_embedding, reference

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(api_keys=[KEY], max_client_batch_size=4, payload_limit=60_000, max_input_tokens=64,
                        max_image_pixels=500_000, max_wait_ms=5)


def post(server, payload=None, *, content=None, headers=AUTH, path="/v1/embeddings") -> httpx.Response:
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    # json.dumps escapes non-ASCII (as most clients do), so lone surrogates travel as valid JSON escapes
    return httpx.post(server.url + path, content=json.dumps(payload), timeout=60,
                      headers={**headers, "Content-Type": "application/json"})


def answers_normally(server, tiny_model) -> None:
    response = post(server, {"input": ["still fine"]})
    assert response.status_code == 200, response.text
    assert_close(decode_embedding(response.json()["data"][0]),
                 reference(tiny_model, {"task": "retrieval", "text": "still fine"}))


def png_bytes(width, height, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


CASES = [
    # (payload, status, code, param)
    ({"model": "gpt-4", "input": "x"}, 404, "model_not_found", "model"),
    ({"input": None}, 400, None, "input"),
    ({}, 400, None, "input"),
    ({"input": []}, 400, None, "input"),
    ({"input": 42}, 400, None, "input"),
    ({"input": [1, 2, 3]}, 400, None, "input"),
    ({"input": ["ok", [1, 2]]}, 400, None, "input[1]"),
    ({"input": ["ok", ""]}, 400, None, "input[1]"),
    ({"input": ["ok", "a \ud800 b"]}, 400, None, "input[1]"),  # a lone surrogate: valid JSON, not UTF-8
    ({"input": [{"text": "ok", "instructions": "\udfff"}]}, 400, None, "input[0]"),
    ({"input": ["ok", 7]}, 400, None, "input[1]"),
    ({"input": ["ok", {"txt": "typo"}]}, 400, None, "input[1].txt"),
    ({"input": ["ok", {"task": "retrieval"}]}, 400, None, "input[1]"),
    ({"input": ["ok", {"text": 5}]}, 400, None, "input[1].text"),
    ({"input": ["ok", {"text": "x", "task": "summarize"}]}, 400, None, "input[1].task"),
    ({"input": ["ok"], "task": "summarize"}, 400, None, "task"),
    ({"input": ["ok", {"text": "x", "adapter": "no-such-adapter"}]}, 404, "adapter_not_found", "input[1].adapter"),
    ({"input": ["ok", {"image": "not base64 at all!"}]}, 400, "image_source_refused", "input[1].image"),
    ({"input": ["ok", {"image": base64.b64encode(b"GIF89a garbage").decode()}]}, 400, "invalid_image",
     "input[1].image"),
    ({"input": ["ok", {"image": "data:image/png,rawnotbase64"}]}, 400, "invalid_image", "input[1].image"),
    ({"input": ["ok", {"image": "ftp://example.com/a.png"}]}, 400, "image_source_refused", "input[1].image"),
    ({"input": ["ok", {"image_embeds": [[0.1, 0.2]], "image_grid_thw": [1, 2, 2]}]}, 400, "invalid_input",
     "input[1]"),
    ({"input": ["ok", {"image_embeds": [[0.1], [0.1, 0.2]], "image_grid_thw": [1, 2, 2]}]}, 400, None,
     "input[1].image_embeds"),
    ({"input": ["ok", {"image_embeds": [[0.1]]}]}, 400, None, "input[1].image_grid_thw"),
    ({"input": "x", "encoding_format": "int8"}, 400, None, "encoding_format"),
    ({"input": "x", "dimensions": 33}, 400, None, "dimensions"),
    ({"input": "x", "dimensions": "32"}, 400, None, "dimensions"),
    ({"input": "x", "dimensions": 32, "return_multivector": True}, 400, None, "dimensions"),
    ({"input": "x", "return_multivector": "yes"}, 400, None, "return_multivector"),
    ({"input": "x", "instructions": ["a"]}, 400, None, "instructions"),
    ({"input": "x", "prompt_set": "nope"}, 400, None, "prompt_set"),
    ({"input": "x", "late_chunking": True}, 400, None, "late_chunking"),
    ({"input": ["a", "b", "c", "d", "e"]}, 413, "too_many_inputs", "input"),
    ({"input": ["ok", "word " * 200]}, 413, "input_too_long", "input[1]"),
    ({"input": ["ok", {"image": base64.b64encode(png_bytes(1000, 1000)).decode()}]}, 413, "image_too_large",
     "input[1].image"),
]


def test_control_tokens_in_text_are_plain_text(server, tiny_model):
    """Decision (docs/architecture.md): control tokens typed by a client are text, never markup or image slots."""
    text = "x <|image_pad|> y <|im_end|>"
    response = post(server, {"input": ["ok", text], "return_multivector": True})
    assert response.status_code == 200, response.text
    got = decode_embedding(response.json()["data"][1])
    assert_close(got, reference(tiny_model, {"task": "retrieval", "text": text}, multivector=True))
    ids = tiny_model.processor.prepare_item({"text": text}).input_ids
    assert tiny_model.config.image_token_id not in ids and got.shape[0] == len(ids)


@pytest.mark.parametrize("payload,status,code,param", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_error_paths(server, tiny_model, payload, status, code, param):
    assert_error(post(server, payload), status, code, param)
    answers_normally(server, tiny_model)


def test_malformed_json_and_framework_errors(server, tiny_model):
    assert_error(post(server, content=b'{"input": ["unterminated'), 400, "invalid_json")
    assert_error(post(server, content=b"\xff\xfe\x00garbage"), 400, "invalid_json")
    assert_error(post(server, content=b'{"input": NaN}'), 400, "invalid_json")
    assert_error(post(server, content=b"[" * 100_00 + b"]" * 100_00), 400, "invalid_json")
    assert_error(post(server, content=b'["a list"]'), 400, "invalid_json")
    assert_error(httpx.get(server.url + "/v1/embeddings", headers=AUTH), 405)
    assert_error(httpx.get(server.url + "/v2/nothing"), 404, "not_found")
    assert_error(httpx.put(server.url + "/v1/models", headers=AUTH), 405)
    answers_normally(server, tiny_model)


def test_payload_limit(server, tiny_model):
    big = {"input": ["a" * 70_000]}
    assert_error(post(server, big), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b" " * 5_000

    response = httpx.post(server.url + "/v1/embeddings", content=chunks(), headers=AUTH, timeout=30)
    assert_error(response, 413, "payload_too_large")
    answers_normally(server, tiny_model)


def test_api_key(server, tiny_model):
    assert_error(post(server, {"input": "x"}, headers={}), 401, "invalid_api_key")
    assert_error(post(server, {"input": "x"}, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(post(server, {"input": "x"}, headers={"Authorization": f"Basic {KEY}"}), 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    answers_normally(server, tiny_model)


def test_requests_refused_before_batching_never_fail_other_clients(server, tiny_model):
    """Bad requests refused while parsing or preparing, sent concurrently with good ones, leave the good ones
    answered with their vectors (rows that fail inside the model: test_nonfinite.py)."""
    good = [{"input": [f"good request {i}"]} for i in range(12)]
    bad = [{"input": ["ok", {"text": "x", "adapter": "missing"}]}, {"input": ["ok", {"image": "%%%"}]},
           {"input": "x", "dimensions": 3}] * 4
    results: dict[int, httpx.Response] = {}

    def send(i, payload):
        results[i] = post(server, payload)

    threads = [threading.Thread(target=send, args=(i, p)) for i, p in enumerate(good + bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, payload in enumerate(good):
        assert results[i].status_code == 200
        assert_close(decode_embedding(results[i].json()["data"][0]),
                     reference(tiny_model, {"task": "retrieval", "text": payload["input"][0]}))
    for i in range(len(good), len(good) + len(bad)):
        assert 400 <= results[i].status_code < 500


def test_fuzzed_inputs_never_500(server):
    rng = np.random.default_rng(0)
    values = [None, True, 0, -1, 1.5, "", "x", [], [None], {}, {"text": None}, [[[]]], {"image": ""},
              {"image": 5}, {"text": "a", "instructions": 3}, {"text": "a", "adapter": 3}, "\x00", "\ud800"]
    keys = ["input", "model", "encoding_format", "dimensions", "task", "instructions", "return_multivector",
            "truncate", "user", "embedding_type", "prompt_set"]
    for _ in range(60):
        payload = {"input": "base"}
        for key in rng.choice(keys, size=2, replace=False):
            payload[str(key)] = values[int(rng.integers(len(values)))]
        try:
            content = httpx.Request("POST", "/", json=payload).content
        except (UnicodeEncodeError, ValueError):
            continue
        response = post(server, content=content)
        assert response.status_code < 500, (payload, response.text)
        if response.status_code != 200:
            assert_error(response, response.status_code)


# ------------------------------------------------------------------------ backpressure and disconnects


@pytest.fixture(scope="module")
def slow_server(start_server):
    # Rows wait up to 1.5 s for a batch to fill, and the queue holds 60 tokens: easy to fill on purpose.
    return start_server(max_wait_ms=1500, max_queue_tokens=60, max_batch_tokens=100_000, max_batch_size=1000)


def test_full_queue_answers_429_with_retry_after(slow_server, tiny_model):
    first: dict = {}
    text = "word " * 40  # ~43 tokens
    thread = threading.Thread(
        target=lambda: first.update(r=httpx.post(slow_server.url + "/v1/embeddings", json={"input": [text]},
                                                 timeout=30)))
    thread.start()
    deadline = time.monotonic() + 5
    while slow_server.metric("nova_queue_rows") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    response = httpx.post(slow_server.url + "/v1/embeddings", json={"input": [text]}, timeout=30)
    err = assert_error(response, 429, "queue_full")
    assert err["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    thread.join()
    assert first["r"].status_code == 200  # the admitted request is served
    response = httpx.post(slow_server.url + "/v1/embeddings", json={"input": [text]}, timeout=30)
    assert response.status_code == 200  # and once the queue drained, the same request is accepted
    assert_close(decode_embedding(response.json()["data"][0]), reference(tiny_model, {"task": "retrieval", "text": text}))
    assert slow_server.metric("nova_rejected_requests_total", {"reason": "queue_full"}) >= 1


def test_disconnected_client_frees_its_rows(slow_server):
    cancelled_before = slow_server.metric("nova_rows_cancelled_total")
    batches_before = slow_server.metric("nova_batch_rows_count")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/embeddings", json={"input": ["one", "two", "three"]}, timeout=0.3)
    deadline = time.monotonic() + 1.0  # well before the 1.5 s batch deadline
    while slow_server.metric("nova_rows_cancelled_total") - cancelled_before < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow_server.metric("nova_rows_cancelled_total") - cancelled_before == 3
    assert slow_server.metric("nova_queue_rows") == 0
    time.sleep(1.5)
    assert slow_server.metric("nova_batch_rows_count") == batches_before  # the rows never reached the model



# ------------------------------------------------------------------------ non-finite numbers and failing batches


def test_non_finite_image_embeds_are_a_400_never_invalid_json(server, tiny_model):
    """1e300 is valid JSON but overflows float32 to inf: the item is refused (`item N:`), so the last guard
    (JSON rendered with allow_nan=False) is never what answers."""
    hidden = tiny_model.config.text_config.hidden_size
    for value in (1e300, -1e300):
        item = {"image_embeds": [[value] * hidden], "image_grid_thw": [1, 2, 2]}
        err = assert_error(post(server, {"input": ["ok", item]}), 400, "invalid_input")
        assert err["message"].startswith("item 1:"), err
        assert err["param"].startswith("input[1]"), err
    answers_normally(server, tiny_model)


def test_a_model_that_returns_nan_answers_400_naming_the_row(start_server, server_model_factory):
    """A broken model (here: a final norm of NaN, as a corrupted checkpoint would give) gives a non-finite vector:
    that row's request answers 400 naming the row, never a body with NaN in it."""
    import torch

    model = server_model_factory()
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight") and "layers" not in n
             and "visual" not in n]
    assert norms
    with torch.no_grad():
        for p in norms:
            p.fill_(float("nan"))
    broken = start_server(model=model)
    try:
        response = httpx.post(broken.url + "/v1/embeddings", json={"input": ["x"]},
                              headers={"X-Request-Id": "nan-probe-1"}, timeout=60)
        err = assert_error(response, 400, "non_finite_embedding", "input[0]")
        assert "non-finite" in err["message"]
        assert response.headers["x-request-id"] == "nan-probe-1"
    finally:
        broken.stop()


POISON = " xqzpoisonqzx"


def test_a_failing_batch_is_retried_row_by_row(start_server, server_model_factory, tiny_model):
    """One row makes the forward pass fail (a fault injected at the model boundary, standing for any row the
    validation missed): the batch is retried row by row, the other clients' rows in that batch succeed with
    the right vectors, and only the client that sent the bad row gets an error."""
    model = server_model_factory()
    real_launch = model.launch_prepared
    poison = model.processor.tokenizer(POISON, add_special_tokens=False)["input_ids"]
    batches: list[tuple[int, bool]] = []

    def has_poison(row) -> bool:
        ids = [int(i) for i in row.input_ids]
        return any(ids[i:i + len(poison)] == poison for i in range(len(ids) - len(poison) + 1))

    def launch_prepared(rows, return_multivector=False, **kwargs):  # a batch's forward
        bad = any(has_poison(r) for r in rows)
        batches.append((len(rows), bad))
        if bad:
            raise RuntimeError("the forward pass failed on one row (fault injected by the test)")
        return real_launch(rows, return_multivector, **kwargs)

    def embed_prepared(rows, return_multivector=False, **kwargs):  # a row retried alone
        return launch_prepared(rows, return_multivector, **kwargs).result()

    model.launch_prepared, model.embed_prepared = launch_prepared, embed_prepared
    slow = start_server(model=model, max_wait_ms=400, max_batch_tokens=100_000, max_batch_size=1000)
    try:
        texts = [f"good client {i}" for i in range(6)]
        results: dict = {}

        def send(key, text):
            results[key] = httpx.post(slow.url + "/v1/embeddings", json={"input": [text]}, timeout=60)

        threads = [threading.Thread(target=send, args=(t, t)) for t in texts]
        threads.append(threading.Thread(target=send, args=("bad", "bad client" + POISON)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert any(n > 1 and bad for n, bad in batches), batches  # the bad row shared a forward with others
        for text in texts:
            assert results[text].status_code == 200, results[text].text
            assert_close(decode_embedding(results[text].json()["data"][0]),
                         reference(tiny_model, {"task": "retrieval", "text": text}))
        assert_error(results["bad"], 500, "internal_error")
    finally:
        slow.stop()
