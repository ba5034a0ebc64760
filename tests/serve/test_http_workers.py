"""`nova serve --http-workers 2`: two HTTP worker processes in front of one model process, as a user runs it
(the real command line, requests on fresh loopback connections, so the kernel spreads them over both workers).
Same vectors as `encode()`, adapters loaded or unloaded through one worker reach the other (an unload drains
every worker first), /metrics adds up both workers, the limits count both, and the server stops cleanly or, if
its model process dies, loudly."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
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

from nova.loading import load_model
from serve.admission import RequestSlots, SharedLimits, Tally
from serve.app import create_app
from serve.config import Settings
from serve.engine.child import AdapterCalls, Link
from serve.engine.framing import FrameReader
from serve.errors import ApiError
from serve.metrics import Metrics
from serve.state import OtherWorkersAdapters, ServerState

ADMIN = {"Authorization": "Bearer admin-test-key"}
FRESH = 16  # requests, each on a connection of its own: both workers answer some (the kernel hands them out)


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
    busy = metric(workers_server, "nova_model_busy_seconds_total")
    # one thread's CPU time within the forwards it ran: never more than their wall time
    assert 0 < metric(workers_server, "nova_model_thread_cpu_seconds_total") <= 1.1 * busy + 0.01


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


def test_create_app_refuses_http_workers_it_would_not_start():
    with pytest.raises(ValueError, match="http_workers > 1 is run by `nova serve`"):
        create_app(Settings(http_workers=2))


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


class ReplyPipe:
    """The server's end of a reply pipe: the frames the model process wrote, one at a time."""

    def __init__(self):
        self.reader, self.writer = multiprocessing.Pipe(duplex=False)
        self.frames = FrameReader()
        self.waiting: list = []

    def next(self, seconds: float = 10):
        deadline = time.monotonic() + seconds
        while not self.waiting and time.monotonic() < deadline:
            if self.reader.poll(0.05):
                self.waiting += self.frames.feed(os.read(self.reader.fileno(), 1 << 20))
        assert self.waiting, "no message from the model process"
        return self.waiting.pop(0)


def test_an_unload_waits_until_every_other_worker_has_drained_the_adapter(tiny_dir):
    """The model process's side (`AdapterCalls`), with a real model and real pipes: an unload asked by worker 0
    asks worker 1 to drain first; while it has not answered the adapter stays; a worker that cannot drain keeps
    it (TimeoutError, every worker gets the unchanged list); once it has drained, the adapter goes."""
    model = load_model(str(tiny_dir), trust_remote_code=True)
    requests = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    replies = [ReplyPipe() for _ in range(2)]
    links = [Link(requests[i][0], replies[i].writer) for i in range(2)]
    calls = AdapterCalls(model, links, drain_timeout=30)
    try:
        for drained in (False, True):
            calls.submit(0, 7, "unload_adapter", ("code",))
            kind, drain_id, name, timeout = replies[1].next()
            assert (kind, name, timeout) == ("drain", "code", 30)
            time.sleep(0.2)
            assert "code" in model.list_adapters()  # not before worker 1 has answered
            calls.drained(drain_id, drained)
            request_id, ok, value, _ = replies[0].next()
            assert request_id == 7 and ok is drained
            if not drained:
                assert isinstance(value, TimeoutError) and "HTTP worker 1" in str(value)
            for reply in replies:  # every worker routes the list as it now is
                kind, adapters = reply.next()
                assert kind == "adapters" and ("code" in adapters) is not drained
    finally:
        calls.shutdown()


def test_a_worker_follows_the_adapter_changes_of_the_others():
    """The worker's side (`OtherWorkersAdapters`): names loaded elsewhere become routable, names unloaded
    elsewhere stop being routed, a drain asked by another worker waits for this worker's admitted rows, and an
    unload elsewhere that failed makes the adapter routable again. This worker's own unload keeps its state."""
    server = ServerState(Settings())
    notices = OtherWorkersAdapters(server)
    gate = server.gate
    notices.adapters_changed({"a": {}, "b": {}})
    assert gate.state == {"a": "ready", "b": "ready"}
    gate.acquire(["b"])  # a row of b admitted here
    assert asyncio.run(notices.drain("b", 0.05)) is False and gate.state["b"] == "draining"
    notices.adapters_changed({"a": {}, "b": {}})  # the unload elsewhere failed
    assert gate.ready("b")
    gate.release("b")
    assert asyncio.run(notices.drain("b", 1.0)) is True
    gate.state["a"] = "draining"  # this worker's own unload of a, in progress
    notices.adapters_changed({"a": {}})  # b unloaded elsewhere
    assert gate.state == {"a": "draining"}
    assert asyncio.run(notices.drain("a", 1.0)) is True  # not routed here any more: nothing to wait for


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
