"""Fixtures for `nova eval` tests: small datasets, a CLI runner, and a real `nova serve` on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nova.evaluation.dataset import write_beir
from nova.training.synthetic import make_task

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("synthetic"), seed=0, train_queries=40, eval_queries=40, distractors=60)


@pytest.fixture
def small_dataset(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
        {"_id": "d2", "title": "", "text": "The Nile is a river in Africa."},
        {"_id": "d3", "title": "Python", "text": "Python is a programming language."},
        {"_id": "d4", "text": "Bread is baked in an oven."},
    ]
    queries = [{"_id": "q1", "text": "capital of France"}, {"_id": "q2", "text": "longest river"},
               {"_id": "q3", "text": "unjudged query"}]
    return write_beir(tmp_path / "small", corpus, queries, {"q1": {"d1": 1}, "q2": {"d2": 1, "d4": 0}})


@pytest.fixture
def run_cli(capsys):
    """Run `nova ...` in-process; returns (exit code, stdout, stderr)."""
    from nova.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`nova serve` as a separate process on 127.0.0.1 (the real command line, the real HTTP stack)."""

    def __init__(self, model_dir: Path, lora_root: Path, admin_key: str = "admin-test-key", extra=()):
        pytest.importorskip("serve.cli")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
        self.log = (lora_root / f"serve-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nova.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
             "--trust-remote-code", "--enable-lora", "--lora-root", str(lora_root), "--admin-api-key", admin_key, "--max-wait-ms", "2",
             *extra],
            cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                text = Path(self.log.name).read_text()[-2000:]
                raise RuntimeError(f"nova serve exited with {self.proc.returncode}:\n{text}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("nova serve did not become healthy in time")

    def load_lora(self, name: str, path: Path):
        import httpx

        return httpx.post(self.url + "/v1/internal/lora/load", json={"lora_name": name, "lora_path": str(path)},
                          headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)

    def embed(self, inputs: list, **extra) -> list:
        import httpx
        import numpy as np

        response = httpx.post(self.url + "/v1/embeddings", json={"input": inputs, **extra}, timeout=120)
        assert response.status_code == 200, response.text
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        return [np.asarray(d["embedding"], dtype=np.float32) for d in data]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def nova_server(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-root")
    server = ServeProcess(Path(tiny_dir), root)
    server.lora_root = root
    yield server
    server.stop()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
