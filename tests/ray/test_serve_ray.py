"""`nova serve --ray --replicas 2` on the session's local Ray: the official OpenAI client gets the vectors of a
plain `nova serve`; adapter loads/unloads reach both replicas (or none); killing a replica loses no request
that the client retried, and its replacement loads the cluster's adapters."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN = {"Authorization": "Bearer admin-key"}
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "def add(a, b): return a + b"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(tiny_dir / "adapters" / "code", root / "mine")
    shutil.copytree(tiny_dir / "adapters" / "text-matching", root / "later")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def ray_server(ray_cluster, lora_root, tiny_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (lora_root.parent / f"ray-serve-{port}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nova.cli", "serve", str(tiny_dir), "--trust-remote-code", "--ray", "--replicas", "2", "--replica-cpus", "0.5",
         "--ray-address", ray_cluster, "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
         "--lora-root", str(lora_root), "--admin-api-key", "admin-key", "--max-wait-ms", "2"],
        cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_replicas(url, 2, proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_replicas(url: str, n: int, proc=None, log=None, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nova serve --ray exited: {Path(log.name).read_text()[-3000:]}")
        try:
            response = httpx.get(url + "/health", timeout=10)
            body = response.json() if response.status_code == 200 else {}
            live = [r for r in body.get("replicas", {}).values() if r["healthy"]]
            if len(live) == n and all(r["adapters_version"] == body["adapters_version"] for r in live):
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{n} healthy replicas did not show up; last /health: {body}")


def adapters_per_replica(url: str, replicas: set[str] | None = None, tries: int = 40,
                         seconds: float = 120) -> dict[str, list[str]]:
    """Ask the admin list route `tries` times, and on until every replica in `replicas` (default: any two)
    answered or `seconds` passed: the proxy routes to a new replica a while after it reports healthy.
    Returns {replica id: its last answer's adapter names}."""
    seen: dict[str, list[str]] = {}
    deadline = time.monotonic() + seconds

    def all_answered() -> bool:
        return set(seen) >= replicas if replicas else len(seen) >= 2

    asked = 0
    while asked < tries or (not all_answered() and time.monotonic() < deadline):
        response = httpx.get(url + "/v1/internal/lora", headers=ADMIN, timeout=30)
        assert response.status_code == 200, response.text
        seen[response.headers["x-nova-replica"]] = sorted(a["lora_name"] for a in response.json()["data"])
        asked += 1
    return seen


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_openai_client_gets_the_vectors_of_a_plain_server(ray_server, serve_process, tiny_dir, lora_root):
    from openai import OpenAI

    plain = serve_process(tiny_dir, lora_root)
    try:
        want = [d.embedding for d in OpenAI(base_url=plain.url + "/v1", api_key="x").embeddings.create(
            model=tiny_dir.name, input=TEXTS).data]
    finally:
        plain.stop()
    client = OpenAI(base_url=ray_server + "/v1", api_key="x")
    for _ in range(4):  # several requests, so both replicas answer some
        got = [d.embedding for d in client.embeddings.create(model=tiny_dir.name, input=TEXTS).data]
        assert cosines(got, want).min() >= 0.9999
    bad = httpx.post(ray_server + "/v1/embeddings", json={"input": [{"text": ""}]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("item 0:")
    metrics = httpx.get(ray_server + "/metrics", timeout=30).text
    replicas = wait_for_replicas(ray_server, 2)["replicas"]
    for rid in replicas:
        assert f'replica="{rid}"' in metrics
    assert metrics.count("# TYPE nova_http_request_duration_seconds histogram") == 1


def test_adapter_changes_reach_every_replica_or_none(ray_server):
    refused = httpx.post(ray_server + "/v1/internal/lora/load", json={"lora_name": "mine", "lora_path": "mine"},
                         timeout=60)
    assert refused.status_code == 401
    response = httpx.post(ray_server + "/v1/internal/lora/load", json={"lora_name": "mine", "lora_path": "mine"},
                          headers=ADMIN, timeout=180)
    assert response.status_code == 200, response.text
    assert response.json()["replicas"] == 2
    seen = adapters_per_replica(ray_server)
    assert len(seen) == 2 and all("mine" in names for names in seen.values()), seen

    broken = httpx.post(ray_server + "/v1/internal/lora/load", json={"lora_name": "bad", "lora_path": "broken"},
                        headers=ADMIN, timeout=180)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_adapter", broken.text
    seen = adapters_per_replica(ray_server)
    assert all("bad" not in names for names in seen.values()), seen

    assert httpx.post(ray_server + "/v1/internal/lora/unload", json={"lora_name": "mine"}, headers=ADMIN,
                      timeout=180).status_code == 200
    seen = adapters_per_replica(ray_server)
    assert len(seen) == 2 and all("mine" not in names for names in seen.values()), seen


def test_killed_replica_loses_no_retried_request_and_its_replacement_loads_the_adapters(
        ray_server, kill_ray_worker):
    from openai import OpenAI

    assert httpx.post(ray_server + "/v1/internal/lora/load", json={"lora_name": "later", "lora_path": "later"},
                      headers=ADMIN, timeout=180).status_code == 200
    before = set(wait_for_replicas(ray_server, 2)["replicas"])
    client = OpenAI(base_url=ray_server + "/v1", api_key="x", max_retries=20, timeout=120)
    want = [d.embedding for d in client.embeddings.create(model="later", input=TEXTS).data]
    results, failures = [], []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                results.append([d.embedding for d in client.embeddings.create(model="later", input=TEXTS).data])
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                failures.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    killed = kill_ray_worker("ServeReplica:nova")
    health = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            health = wait_for_replicas(ray_server, 2)
            if set(health["replicas"]) != before:
                break
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
    assert killed and not failures, failures[:3]
    assert set(health["replicas"]) != before, "the killed replica was not replaced"
    assert len(results) > 10
    for got in results:
        assert cosines(got, want).min() >= 0.9999
    seen = adapters_per_replica(ray_server, set(health["replicas"]))
    assert set(seen) == set(health["replicas"]) and all("later" in names for names in seen.values()), seen
