"""Fixtures for the playground tests: the app (and `nova serve`) on loopback, Debian's headless Chromium.

Nothing is downloaded: Playwright drives /usr/bin/chromium, Gradio analytics are off, no share links.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("NOVA_TEST_CHROMIUM", "/usr/bin/chromium")
SERVE_API_KEY, SERVE_ADMIN_KEY = "test-key", "test-admin-key"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="*")
    for key in ("NOVA_PLAYGROUND_SERVER", "NOVA_PLAYGROUND_MODEL", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def background(cmd: list[str], ready_url: str, name: str, timeout: float = 240.0):
    """Start cmd, wait until ready_url answers 200, yield; stop it (by its own pid) afterwards."""
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(ready_url, timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} did not come up in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def tiny_model():
    from nova.loading import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: Playwright's sync API keeps an event loop running in the main thread while it is open,
    which would break later tests that call asyncio.run()."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium'); set NOVA_TEST_CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    page.outside_requests = outside
    yield page
    context.close()


@pytest.fixture(scope="session")
def app_url(tiny_model):  # the tiny model is generated (once) before the app process needs it
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    from nova.tiny import ensure_tiny_checkpoint

    adapters = ensure_tiny_checkpoint() / "adapters"  # run-time loading allowed from here only
    cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--adapter-root", str(adapters)]
    with background(cmd, url, "app-inprocess"):
        yield url


def serve_available() -> str | None:
    """None when `nova serve` can run here, else why not."""
    try:
        if importlib.util.find_spec("serve.cli") is None:
            return "serve/ has no cli module yet"
        importlib.import_module("serve.cli")
    except Exception as exc:  # noqa: BLE001 - any import problem means: not ready
        return f"serve/ is not importable yet ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def serve_url(tiny_model):
    reason = serve_available()
    if reason:
        pytest.skip(reason)
    from nova.tiny import ensure_tiny_checkpoint

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    checkpoint = ensure_tiny_checkpoint()
    # keys on, and run-time adapter loading from the checkpoint's own adapters folder
    cmd = [sys.executable, "-m", "nova.cli", "serve", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--trust-remote-code", "--api-key", SERVE_API_KEY, "--admin-api-key",
           SERVE_ADMIN_KEY, "--enable-lora", "--lora-root", str(checkpoint / "adapters")]
    with background(cmd, url + "/health", "nova-serve"):  # /health is open; /v1/* need the key
        yield url


@pytest.fixture(scope="session")
def app_server_url(serve_url):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "app.py", "--server", serve_url, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", SERVE_API_KEY, "--admin-api-key", SERVE_ADMIN_KEY]
    with background(cmd, url, "app-server"):
        yield url
