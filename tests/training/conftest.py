"""Fixtures for `nova train` tests: the synthetic task, one real training run shared by the tests that
inspect its results, a CLI runner and a real `nova serve` on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nova.training.synthetic import make_task

REPO = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 300


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """240 training triplets (3 hard negatives each); 60 held-out queries over 180 documents."""
    return make_task(tmp_path_factory.mktemp("task"), seed=0)


@pytest.fixture
def run_cli(capsys):
    from nova.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained(task, tiny_dir, tmp_path_factory):
    """One `nova train` run (the real command, in-process): 300 steps from scratch, held-out eval at the end."""
    from nova.cli import main

    root = tmp_path_factory.mktemp("lora-root")
    out = root / "pairs-adapter"
    adapters_before = tree_digest(Path(tiny_dir) / "adapters")
    started = time.perf_counter()
    code = main(["train", "--data", str(task["train"]), "--out", str(out), "--steps", str(TRAIN_STEPS),
                 "--lr", "2e-3", "--batch-size", "16", "--rank", "16", "--eval-dataset", str(task["eval"]),
                 "--checkpoint-every", "100", "--no-progress", "--log-every", "100"])
    assert code == 0
    return {"out": out, "root": root, "adapters_before": adapters_before, "seconds": time.perf_counter() - started,
            "steps": TRAIN_STEPS}


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
def nova_server(tiny_dir, trained):
    server = ServeProcess(Path(tiny_dir), trained["root"])
    yield server
    server.stop()
