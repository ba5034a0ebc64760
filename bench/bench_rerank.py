"""Rerank benchmark: `POST /v1/rerank` of 100 short passages against one query vs `POST /v1/embeddings` of the
same 100 passages plus the query in one request (multi-vectors, what MaxSim needs; and pooled, what cosine
needs), on one `nova serve`, from ONE run: the requests alternate, each ratio is taken inside a round and the
median over rounds is printed (these machines are noisy; never compare numbers from different runs).

What the ratio shows is what reranking adds to embedding: parsing, MaxSim over the returned multi-vectors and
a small JSON answer, against rendering and sending every [n, 128] multi-vector. Usage:

    .venv/bin/python bench/bench_rerank.py                      # CPU, the 'small' random-weight config
    .venv/bin/python bench/bench_rerank.py --passages 100 --rounds 9 --model ./nova-v1 --device cuda
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY = "which passages talk about batching requests on the server"


def passages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("embedding server batch token adapter vector query passage retrieval model request latency "
             "throughput image text code cosine").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(client: httpx.Client, path: str, body: dict) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the 'small' random config)")
    parser.add_argument("--passages", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from nova.tiny import ensure_tiny_checkpoint

    model_dir = args.model or str(ensure_tiny_checkpoint(size="small"))
    port = free_port()
    cmd = [sys.executable, "-m", "nova.cli", "serve", model_dir, "--trust-remote-code", "--port", str(port),
           "--max-client-batch-size", str(args.passages + 1), "--device", args.device]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nova serve did not start: {' '.join(cmd)}")
            time.sleep(0.5)
        texts = passages(args.passages)
        query = {"task": "retrieval.query", "text": QUERY}
        documents = [{"task": "retrieval.passage", "text": t} for t in texts]
        cases = {
            "rerank maxsim": ("/v1/rerank", {"query": QUERY, "documents": texts, "return_documents": False}),
            "embed multi-vector": ("/v1/embeddings", {"input": [query, *documents], "return_multivector": True,
                                                      "encoding_format": "base64"}),
            "rerank cosine": ("/v1/rerank", {"query": QUERY, "documents": texts, "scoring": "cosine",
                                             "return_documents": False}),
            "embed pooled": ("/v1/embeddings", {"input": [query, *documents], "encoding_format": "base64"}),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        with httpx.Client(base_url=url, timeout=600) as client:
            for path, body in cases.values():  # warm-up: first-shape costs out of the figures
                timed(client, path, body)
            for _ in range(args.rounds):
                for name, (path, body) in cases.items():
                    times[name].append(timed(client, path, body))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{args.passages} passages + 1 query, {args.rounds} rounds, model {args.model or 'small random config'}, "
          f"device {args.device}")
    for name, values in times.items():
        print(f"  {name:20s} median {1000 * statistics.median(values):8.1f} ms")
    for rerank, embed in (("rerank maxsim", "embed multi-vector"), ("rerank cosine", "embed pooled")):
        ratios = [r / e for r, e in zip(times[rerank], times[embed], strict=True)]
        print(f"  {rerank} / {embed}: {statistics.median(ratios):.3f}x (median of per-round ratios)")
    return 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
