"""Server fixtures: a REAL uvicorn on 127.0.0.1 (random free port, in a thread) around `create_app`, with
its own model instance loaded from the tiny checkpoint. Reference vectors come from the session's
in-process `tiny_model` (tests/conftest.py).

Every image fetcher made in these tests connects through `LoopbackOnlyTransport`: whatever the URL guard under
test decides, no socket is ever opened to an address other than 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from serve_helpers import LoopbackOnlyTransport

from nova.loading import load_model
from serve.app import create_app
from serve.config import Settings
from serve.images import ImageFetcher


@pytest.fixture(autouse=True, scope="session")
def image_fetches_stay_on_loopback():
    """Every ImageFetcher built during the tests (the servers' and the tests' own) gets the loopback-only
    transport unless a test passes one explicitly."""
    original = ImageFetcher.__init__

    def guarded(self, policy, *, transport=None, **kwargs):
        original(self, policy, transport=transport or LoopbackOnlyTransport(), **kwargs)

    ImageFetcher.__init__ = guarded
    yield
    ImageFetcher.__init__ = original


class LiveServer:
    def __init__(self, settings: Settings, model=None):
        self.settings = settings
        self.app = create_app(settings, model=model)
        self.state = self.app.state.nova
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("server thread died")
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str, labels: dict | None = None) -> float:
        """Sum of a metric's samples (matching `labels`) from GET /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_dir):
    """A `--lora-root` holding one adapter, `mine` (a copy of the tiny checkpoint's `code` adapter)."""
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(tiny_dir / "adapters" / "code", root / "mine")
    return root


@pytest.fixture(scope="session")
def server_model_factory(tiny_dir):
    """A fresh model instance per server (servers load/unload adapters; the reference stays untouched)."""

    def make(**kwargs):
        return load_model(tiny_dir, **kwargs)

    return make


@pytest.fixture(scope="session")
def start_server(server_model_factory):
    started: list[LiveServer] = []

    def start(model=None, **overrides) -> LiveServer:
        settings = Settings(**overrides)
        if model is None:
            model = server_model_factory(max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank)
        server = LiveServer(settings, model=model)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
