"""What instructions cost, in process: short queries without instructions, with one shared instruction and
with three different instructions in the same traffic, each with the prefix cache (what Nova does) and
without it (the naive figure: every row computes its instruction in full).

    python bench/bench_instructions.py                       # CPU, the "small" random config
    python bench/bench_instructions.py --device cuda --size full
    python bench/bench_instructions.py --server               # the same traffic through two `nova serve`
                                                              # (prefix cache on / --prefix-cache-mb 0)

Prints items/s per case (median of interleaved rounds, so drift on a noisy machine hits every case alike) and
each case's ratio to the no-instruction throughput. Targets: one instruction >= 0.8x, three >= 0.75x.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# ~16-token queries (with the "Query: " prompt), varied so batches are realistically padded.
QUERIES = [
    "what is the capital of france and why did it become the seat of power",
    "how do i sort a list of dictionaries by a key in python quickly",
    "symptoms of vitamin d deficiency in adults who work night shifts",
    "best hiking trails near lake tahoe for beginners with small dogs",
    "difference between a roth ira and a traditional ira for freelancers",
    "why does my sourdough bread come out dense and flat every time",
    "simple proof that there are infinitely many prime numbers explained",
    "how long does concrete need to cure before you can drive on it",
]
INSTRUCTIONS = [
    "Given a web search query, retrieve the passages from the knowledge base that answer the question "
    "directly and completely, preferring precise, recent and trustworthy sources over general overviews.",
    "Given a question from a developer, retrieve the code snippets and documentation pages that solve the "
    "problem at hand, preferring short working examples over long discussions of the general topic.",
    "Given a health question from a patient, retrieve the medical literature that answers it, preferring "
    "peer-reviewed clinical guidance and official recommendations over forum posts and popular articles.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="small",
                        help="random-weight config: nova tiny --size small (default), or the full 3B shape")
    parser.add_argument("--items", type=int, default=64, help="queries per round and case")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", action="store_true",
                        help="send the traffic to real `nova serve` processes on loopback instead of in process")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (--server)")
    parser.add_argument("--per-request", type=int, default=8, help="items per request (--server)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint

    device = torch.device(args.device)
    if args.server and args.size == "full":
        parser.error("--server runs a checkpoint directory: use --size tiny or small")
    if args.size == "full":
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_check import random_model

        model = random_model(device, "full")
    else:
        model = load_model(ensure_tiny_checkpoint(size=args.size), device=str(device))
    torch.set_grad_enabled(False)
    queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)]} for i in range(args.items)]
    one = [dict(q, instructions=INSTRUCTIONS[0]) for q in queries]
    three = [dict(q, instructions=INSTRUCTIONS[i % 3]) for i, q in enumerate(queries)]
    processor = model.processor
    q_tokens = statistics.mean(processor.prepare_item(q).num_tokens for q in queries)
    i_tokens = [len(processor.instruction_ids(text)) for text in INSTRUCTIONS]
    cache = model.prefix_cache
    naive = type(cache)(0)  # a disabled cache: swapped in for the naive cases, so the live one stays warm
    cases = {  # name -> (items, prefix cache on)
        "no instructions": (queries, True),
        "one instruction, cached": (one, True),
        "one instruction, naive": (one, False),
        "three instructions, cached": (three, True),
        "three instructions, naive": (three, False),
    }

    servers = {}
    if args.server:
        model_dir = ensure_tiny_checkpoint(size=args.size)
        servers = {True: serve(model_dir, 256, args.device), False: serve(model_dir, 0, args.device)}

    def run(items, cached: bool) -> float:
        if servers:
            return through_server(servers[cached][0], items, args.clients, args.per_request)
        model.prefix_cache = cache if cached else naive
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.encode(items, batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(items) / (time.perf_counter() - start)

    try:
        for items, cached in cases.values():  # warm-up: allocations, and the cache's first (missing) prefixes
            run(items, cached)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (items, cached) in cases.items():
                rates[name].append(run(items, cached))
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    model.prefix_cache = cache
    medians = {name: statistics.median(values) for name, values in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    where = (f"through nova serve ({args.clients} clients x {args.per_request} items per request)" if servers
             else f"in process, batch {args.batch_size}")
    print(f"{time.strftime('%Y-%m-%d')} on {name}; {args.size} config; {args.items} queries of {q_tokens:.1f} tokens; "
          f"{where}; instruction turns of {i_tokens} tokens; median of {args.rounds} interleaved rounds")
    base = medians["no instructions"]
    for case, rate in medians.items():
        print(f"  {case:28s} {rate:9.1f} items/s   {rate / base:5.2f}x")
    if not servers:
        print(f"  prefix cache: {cache.stats()}")
    print(f"target: one instruction >= 0.80x (got {medians['one instruction, cached'] / base:.2f}x, naive "
          f"{medians['one instruction, naive'] / base:.2f}x); three >= 0.75x (got "
          f"{medians['three instructions, cached'] / base:.2f}x, naive {medians['three instructions, naive'] / base:.2f}x)")
    return 0


def serve(model_dir: pathlib.Path, prefix_cache_mb: int, device: str):
    """A real `nova serve` on loopback; returns (url, process)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nova.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--trust-remote-code", "--device", device, "--prefix-cache-mb", str(prefix_cache_mb), "--max-wait-ms", "2"],
        cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nova serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("nova serve did not become healthy")


def through_server(url: str, items: list, clients: int, per_request: int) -> float:
    """items/s for `items` sent as requests of `per_request` by `clients` concurrent clients."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    requests = [items[i : i + per_request] for i in range(0, len(items), per_request)]
    with httpx.Client(timeout=300) as client:
        def send(chunk):
            response = client.post(url + "/v1/embeddings", json={"input": chunk})
            response.raise_for_status()

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, requests))
        return len(items) / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
