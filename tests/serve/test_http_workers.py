"""`nova serve --http-workers 2`: two HTTP worker processes in front of one model process, as a user runs it
(the real command line, requests on fresh loopback connections, so the kernel spreads them over both workers).
Same vectors as `encode()`, adapters loaded or unloaded through one worker reach the other, /metrics adds up
both workers, the limits count both, and the server stops cleanly or, if its model process dies, loudly."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import (
    assert_close,
    assert_error,
    check_concurrent_clients,
    child_pids,
    decode_embedding,
    reference,
)

from serve.admission import RequestSlots, SharedLimits, Tally
from serve.errors import ApiError
from serve.metrics import Metrics

ADMIN = {"Authorization": "Bearer admin-test-key"}
FRESH = 16  # requests, each on a connection of its own: both workers answer some (the kernel hands them out)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("workers-lora-root")
    shutil.copytree(tiny_dir / "adapters" / "code", root / "mine")
    return root


@pytest.fixture(scope="module")
def workers_server(serve_process, tiny_dir, lora_root):
    server = serve_process(tiny_dir, lora_root, extra=["--http-workers", "2"])
    deadline = time.monotonic() + 60
    healthy = 0
    while healthy < 2 * FRESH and time.monotonic() < deadline:  # both workers have their model ready
        healthy = healthy + 1 if httpx.get(server.url + "/health", timeout=5).status_code == 200 else 0
    yield server
    server.stop()


def post(server, payload: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=payload, timeout=60)


def metric(server, name: str, labels: dict | None = None) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def worker_pids(server) -> list[int]:
    """The model process and the HTTP workers, in the order the supervisor started them."""
    pids = []
    for kid in child_pids(server.proc.pid):
        with open(f"/proc/{kid}/cmdline", "rb") as fh:
            if b"spawn_main" in fh.read():
                pids.append(kid)
    return pids


def test_concurrent_clients_get_their_own_vectors_and_metrics_add_up_both_workers(workers_server, tiny_model):
    assert len(worker_pids(workers_server)) == 3  # the model process and two HTTP workers
    ok = {"route": "/v1/embeddings", "status": "200"}
    requests_before = metric(workers_server, "nova_http_requests_total", ok)
    rows_before = metric(workers_server, "nova_batch_rows_sum")
    clients = 16
    check_concurrent_clients(workers_server.url, tiny_model, clients)
    # whichever worker answers /metrics counts both workers' requests and rows
    assert metric(workers_server, "nova_http_requests_total", ok) - requests_before == clients
    assert metric(workers_server, "nova_batch_rows_sum") - rows_before == 2 * clients
    forwards = metric(workers_server, "nova_model_forwards_total")
    assert 0 < forwards <= metric(workers_server, "nova_batch_rows_count") + 1e-6


def test_an_adapter_loaded_or_unloaded_through_one_worker_is_routed_by_both(workers_server, tiny_model):
    item = {"text": "def add(a, b): return a + b", "task": "code.passage", "adapter": "mine"}
    assert workers_server.load_lora("mine", Path("mine")).status_code == 200
    want = reference(tiny_model, {**item, "adapter": "code"})
    for _ in range(FRESH):
        response = post(workers_server, {"input": [item], "encoding_format": "base64"})
        assert response.status_code == 200, response.text
        assert_close(decode_embedding(response.json()["data"][0]), want)
    unload = httpx.post(workers_server.url + "/v1/internal/lora/unload", json={"lora_name": "mine"}, headers=ADMIN,
                        timeout=60)
    assert unload.status_code == 200, unload.text
    for _ in range(FRESH):
        assert_error(post(workers_server, {"input": [item]}), 404, "adapter_not_found", "input[0].adapter")
    for _ in range(4):
        listed = httpx.get(workers_server.url + "/v1/internal/lora", headers=ADMIN, timeout=30).json()["data"]
        assert "mine" not in [a["lora_name"] for a in listed]


def test_the_concurrency_limit_counts_every_workers_requests():
    """Two workers' `RequestSlots` over one shared count (as `nova serve --http-workers` gives them): a request
    held in one worker takes the last slot from the other."""
    limits = SharedLimits.create(multiprocessing.get_context("spawn"))
    first, second = (RequestSlots(2, Metrics(), Tally(limits.requests)) for _ in range(2))
    with first.hold(lambda: 1), second.hold(lambda: 1):
        with pytest.raises(ApiError) as refused, first.hold(lambda: 1):
            pass
        assert refused.value.status == 429
        assert (first.in_use, second.in_use) == (2, 2)
    with second.hold(lambda: 1):
        assert first.in_use == 1
    assert limits.requests.value == 0


def test_sigterm_stops_every_process_cleanly(workers_server):
    pids = worker_pids(workers_server)
    workers_server.proc.send_signal(signal.SIGTERM)
    assert workers_server.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_a_dead_model_process_stops_every_worker_with_one_error_line(serve_process, tiny_dir, tmp_path):
    server = serve_process(tiny_dir, tmp_path, extra=["--http-workers", "2"])
    try:
        engine, *workers = worker_pids(server)  # spawned first
        os.kill(engine, signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1
        server.log.flush()
        errors = [line for line in Path(server.log.name).read_text().splitlines()
                  if line.startswith("nova serve: error:")]
        assert len(errors) == 1 and "the model process exited" in errors[0], errors
    finally:
        server.stop()
