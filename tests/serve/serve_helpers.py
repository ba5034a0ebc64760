"""Helpers shared by the server tests (images, decoding, reference vectors, error-shape checks, ports)."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading

import httpcore
import httpx
import numpy as np
from PIL import Image

COS_MIN = 0.9999


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_png(width: int = 64, height: int = 64, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(**kwargs) -> str:
    return base64.b64encode(make_png(**kwargs)).decode()


def data_url(**kwargs) -> str:
    return "data:image/png;base64," + b64_png(**kwargs)


def decode_embedding(entry: dict) -> np.ndarray:
    emb = entry["embedding"]
    if isinstance(emb, str):
        array = np.frombuffer(base64.b64decode(emb), dtype="<f4")
        if "shape" in entry:
            array = array.reshape(entry["shape"])
        return array
    return np.asarray(emb, dtype=np.float32)


def reference(model, item, *, instructions=None, dimensions=None, multivector=False) -> np.ndarray:
    """In-process encode() of this item alone (images given as PIL, as a Python user would)."""
    item = dict(item) if isinstance(item, dict) else item
    if isinstance(item, dict) and isinstance(item.get("image"), str):
        raw = item["image"].split(",", 1)[-1]
        item["image"] = Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB")
    out = model.encode([item], instructions=instructions, dimensions=dimensions, return_multivector=multivector)
    return out[0].numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.ndim == 1:
        cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos >= COS_MIN, cos
    else:
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert float(cos.min()) >= COS_MIN, float(cos.min())


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


class LoopbackOnlyBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, refusing at connect time every TCP target but 127.0.0.1 (and every Unix
    socket). `refused` records what a regressed guard would have reached."""

    refused: list[tuple[str, int]] = []

    def __init__(self, inner: httpcore.AsyncNetworkBackend):
        self.inner = inner

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if host != "127.0.0.1":
            LoopbackOnlyBackend.refused.append((host, port))
            raise httpcore.ConnectError(f"test network guard: no connection to {host}:{port} (loopback only)")
        return await self.inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                            socket_options=socket_options)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("test network guard: no Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class LoopbackOnlyTransport(httpx.AsyncHTTPTransport):
    def __init__(self):
        super().__init__(trust_env=False)
        pool = self._pool  # httpx keeps its httpcore pool here; fail loudly if a new httpx moves it
        assert isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend")
        pool._network_backend = LoopbackOnlyBackend(pool._network_backend)


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (from /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(k) for k in fh.read().split()]
    return found


def check_concurrent_clients(url: str, model, clients: int = 12) -> None:
    """`clients` threads post at once, each a query and a passage of its own; every client must get its own
    vectors (as `encode()` gives them)."""
    words = ("rivers mountains planets violins engines gardens castles oceans forests deserts harbors tunnels "
             "meadows glaciers canyons islands").split()
    texts = [f"client {i} asks about {words[i % len(words)]}" for i in range(clients)]
    answers: dict[int, list] = {}

    def client(i: int) -> None:
        items = [{"text": texts[i], "task": "retrieval.query"}, {"text": texts[-1 - i], "task": "retrieval.passage"}]
        response = httpx.post(url + "/v1/embeddings", json={"input": items, "encoding_format": "base64"}, timeout=60)
        assert response.status_code == 200, response.text
        answers[i] = [decode_embedding(item) for item in response.json()["data"]]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == list(range(clients))
    for i, (first, second) in answers.items():
        assert_close(first, reference(model, {"text": texts[i], "task": "retrieval.query"}))
        assert_close(second, reference(model, {"text": texts[-1 - i], "task": "retrieval.passage"}))
