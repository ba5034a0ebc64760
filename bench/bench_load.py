"""Open-loop load on an embedding server: Poisson arrivals at a set rate, swept up to saturation.

Closed-loop clients (N threads, each waiting for its answer) measure the server at N requests in flight, and
N clients answered together come back together: they split into cohorts, so batches carry a fraction of what
they could, and one process of client threads may not send what a GPU answers. Here the requests arrive at
Poisson times, independently of the answers (from several client processes, each an asyncio loop that sends
at its arrival times without waiting), one ~15-word sentence per request in the plain OpenAI form.

The rate sweeps up (doubling from --start-rate) until the server answers less than 90% of what is offered,
then refines between the last rate it kept up with and the first it did not. Per rate it prints:
offered and answered req/s, p50/p99 latency (from each request's scheduled time, so a client running late
does not hide queueing), HTTP errors, rows per forward and the model's busy share (from the server's /metrics:
`nova_batch_rows` over `nova_model_forwards`, and `nova_model_busy_seconds` over the window), the CPU time of
the thread that runs forwards per forward (`fwd CPU`: with the stand-in, or a device waited on without
spinning, the host work of launching a batch, the time that thread needs the GIL), the server's CPU
ms per request (when this script started it), and the load generator's own CPU use: each client process's
CPU seconds over its wall time, so that a client process near one core, not the server, is seen to set the
pace. Then, for comparison, the closed-loop mode at 1 / 8 / 32 client threads (bench_server.py's), and the
in-process reference: `encode()` of the same sentences at its best batch size. Ratios are computed within
this one run.

With `--stand-in-ms MS` the server's forward is replaced by a fixed-cost wait that releases the GIL
(serve/stand_in.py): the pipeline as a GPU would see it, on any machine (an asynchronous device, unless
`--stand-in-waits`). Its reference is then the forward's own capacity (rows per batch budget / cost of a full
batch), and the stand-in's counts are printed per rate: what the model found at the end of each forward (the
next forward launched behind it, the next batch collated, being collated, only queued rows, nothing).

Usage:
    .venv/bin/python bench/bench_load.py                          # tiny checkpoint, `nova serve` started here
    .venv/bin/python bench/bench_load.py --stand-in-ms 20 --max-batch-size 16
    .venv/bin/python bench/bench_load.py --model /tmp/nova-full --device cuda --client-processes 8
    .venv/bin/python bench/bench_load.py --url http://127.0.0.1:8080 --model DIR   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from bench_server import (
    ROOT,
    free_port,
    in_process,
    make_sentences,
    run_sentence_clients,
    server_activity,
    server_cpu_seconds,
    server_metrics,
)

from serve.config import DEFAULT_MAX_BATCH_SIZE

ANSWERED_SHARE_KEPT_UP = 0.9  # below this share of the offered rate answered, the rate is past saturation
# A client process that sent a request this far behind its schedule (CPU-starved, or its loop blocked) did not
# offer the rate asked for: the row is marked as bound by the load generator.
LATE_MS = 50.0


# ------------------------------------------------------------------------------------------------ clients


@dataclass
class ClientRun:
    """One client process's run at one rate: per answered request (scheduled offset s, latency s, HTTP status;
    0 for a transport error), how many had no answer by the end of the drain, its clock and its CPU seconds."""

    requests: list[tuple[float, float, int]]
    unanswered: int
    started: float  # time.time() of the window's start (shared by the processes)
    ended: float  # time.time() of the last answer
    cpu_s: float
    most_late_s: float  # how far behind its schedule the process sent a request, at most


class Connections:
    """Up to `most` keep-alive connections, one httpx client each, lent to one request at a time. (One shared
    client's pool scans every connection, and for each idle one counts the idle ones again, at each request's
    start and end (httpcore 1.0): with hundreds of connections that cost the client more than the server.)"""

    def __init__(self, url: str, most: int, timeout: float):
        tls = ssl.create_default_context()  # built once: httpx builds one per client otherwise (~0.1 s each)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.clients = [httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, verify=tls)
                        for _ in range(most)]
        self.idle = list(self.clients)
        self.free = asyncio.Semaphore(most)  # requests beyond `most` in flight wait here

    async def post(self, path: str, body: dict) -> httpx.Response:
        async with self.free:
            http = self.idle.pop()
            try:
                return await http.post(path, json=body)
            finally:
                self.idle.append(http)

    async def open(self, count: int) -> None:
        """Connect `count` of them now, as a long-running client has its connections open."""
        await asyncio.gather(*(http.get("/health") for http in self.clients[:count]))

    async def aclose(self) -> None:
        await asyncio.gather(*(http.aclose() for http in self.clients))


async def _open_loop(url: str, sentences: list[str], rate: float, duration: float, start_at: float,
                     drain_s: float, seed: int, connections: int) -> ClientRun:
    rng = random.Random(seed)
    pool = Connections(url, connections, timeout=duration + drain_s + 60)
    await pool.open(min(connections, 16))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0, wall0 = time.perf_counter(), time.time()
    cpu0 = _cpu_seconds()
    results: list[tuple[float, float, int]] = []
    most_late = 0.0

    async def one(sentence: str, scheduled: float) -> None:
        try:
            status = (await pool.post("/v1/embeddings", {"input": sentence, "encoding_format": "base64"})).status_code
        except httpx.HTTPError:
            status = 0
        results.append((scheduled, time.perf_counter() - t0 - scheduled, status))

    tasks = []
    at = rng.expovariate(rate)
    while at < duration:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            most_late = max(most_late, -delay)
            await asyncio.sleep(0)  # let answers in even while behind
        tasks.append(asyncio.create_task(one(sentences[len(tasks) % len(sentences)], at)))
        at += rng.expovariate(rate)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + duration + drain_s - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ended = wall0 + max((s + lat for s, lat, _ in results), default=0.0)
    cpu = _cpu_seconds() - cpu0
    await pool.aclose()
    return ClientRun(results, len(tasks) - len(results), wall0, ended, cpu, most_late)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(url: str, sentences: list[str], seed: int, connections: int, commands, results) -> None:
    """One client process: runs each (rate, duration, start_at, drain_s) it is sent, until None."""
    while (command := commands.get()) is not None:
        rate, duration, start_at, drain_s = command
        results.put(asyncio.run(_open_loop(url, sentences, rate, duration, start_at, drain_s, seed, connections)))
        seed += 1000


class OpenLoopClients:
    """`processes` client processes, started once (spawning and importing httpx is not part of any window)."""

    def __init__(self, url: str, sentences: list[str], processes: int, connections: int):
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(processes)]
        self.workers = [context.Process(target=_client_process, daemon=True, args=(
            url, sentences[i::processes], 1 + i, connections, self.commands[i], self.results))
            for i in range(processes)]
        for worker in self.workers:
            worker.start()

    def run(self, rate: float, duration: float, drain_s: float) -> list[ClientRun]:
        start_at = time.time() + 1.0  # every process has its connections open by then
        for commands in self.commands:
            commands.put((rate / len(self.commands), duration, start_at, drain_s))
        return [self.results.get() for _ in self.commands]

    def close(self) -> None:
        """Ends the processes: at once if one is still in a run (this script was stopped mid-rate)."""
        for commands in self.commands:
            commands.put(None)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.terminate()


# ------------------------------------------------------------------------------------------------ one rate


@dataclass
class RatePoint:
    rate: float  # asked for
    offered: float  # sent per second
    answered: float  # answered (200) within the window, per second
    p50_ms: float
    p99_ms: float
    errors: int  # non-200 answers and requests with no answer by the end of the drain
    rows_per_batch: float
    model_busy: float
    model_thread_cpu_ms: float  # CPU of the thread that runs forwards, per forward
    server_cpu_ms: float | None
    client_cpu_cores: float  # all client processes together
    client_cpu_max: float  # the busiest client process, in cores: near 1, the generator sets the pace
    most_late_ms: float
    stand_in: dict[str, float] | None
    host_lead_ms: float | None = None  # the batcher's lead at the rate's end (nova_batcher_host_lead_seconds)

    @property
    def kept_up(self) -> bool:
        return self.answered >= ANSWERED_SHARE_KEPT_UP * self.offered


def measure_rate(clients: OpenLoopClients, url: str, rate: float, duration: float, drain_s: float,
                 server_pid: int | None) -> RatePoint:
    before = server_metrics(url)
    cpu_before = server_cpu_seconds(server_pid) if server_pid else None
    runs = clients.run(rate, duration, drain_s)
    after = server_metrics(url)
    requests = [r for run in runs for r in run.requests]
    unanswered = sum(run.unanswered for run in runs)
    ok = [(s, lat) for s, lat, status in requests if status == 200]
    latencies = np.array([lat for _, lat in ok]) * 1000 if ok else np.array([np.nan])
    window = max(run.ended for run in runs) - min(run.started for run in runs)
    activity = server_activity(before, after, max(window, duration))
    stand_in = None
    if "nova_stand_in_forwards_total" in after:
        ends = [key for key in after if key.startswith("nova_stand_in_forward_ends_total{")]  # per next_batch
        stand_in = {key.split('"')[1]: after[key] - before[key] for key in ends}
        stand_in["busy"] = (after["nova_stand_in_busy_seconds_total"]
                            - before["nova_stand_in_busy_seconds_total"]) / max(window, duration)
    return RatePoint(
        rate=rate, offered=(len(requests) + unanswered) / duration,
        answered=sum(1 for s, lat in ok if s + lat <= duration) / duration,
        p50_ms=float(np.percentile(latencies, 50)), p99_ms=float(np.percentile(latencies, 99)),
        errors=len(requests) + unanswered - len(ok), rows_per_batch=activity["rows_per_batch"], model_busy=activity["model_busy"],
        model_thread_cpu_ms=activity["model_thread_cpu_ms"],
        server_cpu_ms=((server_cpu_seconds(server_pid) - cpu_before) * 1000 / max(len(ok), 1)
                       if server_pid else None),
        client_cpu_cores=sum(run.cpu_s for run in runs) / max(window, duration),
        client_cpu_max=max(run.cpu_s / max(run.ended - run.started, duration) for run in runs),
        most_late_ms=max(run.most_late_s for run in runs) * 1000, stand_in=stand_in,
        host_lead_ms=after["nova_batcher_host_lead_seconds"] * 1000 if "nova_batcher_host_lead_seconds" in after else None)


def sweep(clients: OpenLoopClients, url: str, args, server_pid: int | None) -> list[RatePoint]:
    """Doubling from --start-rate until the server falls behind (halving instead if it falls behind at once),
    then --refine bisection steps (geometric) between the last rate it kept up with and the first it did not."""
    points: list[RatePoint] = []

    def at(rate: float) -> RatePoint:
        point = measure_rate(clients, url, rate, args.duration, args.drain, server_pid)
        points.append(point)
        print(row(point), flush=True)
        return point

    print(header(), flush=True)
    rate, good, bad = args.start_rate, None, None
    while rate <= args.max_rate:
        if at(rate).kept_up:
            good, rate = rate, rate * 2
        else:
            bad = rate
            break
    while good is None and bad is not None and bad > args.start_rate / 16:  # --start-rate was already too high
        if at(bad / 2).kept_up:
            good = bad / 2
        else:
            bad /= 2
    for _ in range(args.refine if good is not None and bad is not None else 0):
        middle = (good * bad) ** 0.5
        if at(middle).kept_up:
            good = middle
        else:
            bad = middle
    return points


def header() -> str:
    return (f"{'rate':>7} {'offered':>8} {'answered':>9} {'p50 ms':>8} {'p99 ms':>9} {'errors':>6} {'rows/b':>7} "
            f"{'busy':>5} {'fwd CPU':>8} {'srv CPU':>8} {'client CPU':>14} {'late ms':>8}  stand-in forward ends")


def row(p: RatePoint) -> str:
    server_cpu = f"{p.server_cpu_ms:6.2f}ms" if p.server_cpu_ms is not None else f"{'-':>8}"
    limit = "  CLIENT-BOUND" if p.client_cpu_max > 0.8 or p.most_late_ms > LATE_MS else ""
    ends = ""
    if p.stand_in is not None:
        counts = " ".join(f"{state} {n:.0f}" for state, n in p.stand_in.items() if state != "busy")
        ends = f"  {counts} (busy {p.stand_in['busy']:.0%})"
    return (f"{p.rate:7.1f} {p.offered:8.1f} {p.answered:9.1f} {p.p50_ms:8.1f} {p.p99_ms:9.1f} {p.errors:6d} "
            f"{p.rows_per_batch:7.1f} {p.model_busy:5.0%} {p.model_thread_cpu_ms:6.2f}ms {server_cpu} {p.client_cpu_cores:5.2f} (max {p.client_cpu_max:.2f})"
            f" {p.most_late_ms:8.1f}{ends}{limit}")


# ------------------------------------------------------------------------------------------------ server


def start_server(args, port: int) -> subprocess.Popen:
    """`nova serve` on the model (or the stand-in server around it)."""
    common = ["--port", str(port), "--log-level", "warning", "--http-workers", str(args.http_workers),
              *(["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []),
              *(["--max-wait-ms", str(args.max_wait_ms)] if args.max_wait_ms is not None else [])]
    if args.stand_in_ms is not None:
        cmd = [sys.executable, "-m", "serve.stand_in", args.model_dir, "--stand-in-ms", str(args.stand_in_ms),
               "--stand-in-row-ms", str(args.stand_in_row_ms), "--stand-in-launch-ms", str(args.stand_in_launch_ms),
               *(["--stand-in-waits"] if args.stand_in_waits else []),
               *common]
    else:
        cmd = [sys.executable, "-m", "nova.cli", "serve", args.model_dir, "--trust-remote-code", *common,
               "--device", args.device, *(["--engine", args.engine] if args.engine else []),
               *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
               *(["--cuda-graphs"] if args.cuda_graphs else [])]
    print("server:", " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, server: subprocess.Popen | None, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy in {seconds:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


# ------------------------------------------------------------------------------------------------ reference


def reference(args, sentences: list[str], row_budget: int) -> tuple[float, str]:
    """(sentences/s, how it was obtained) that the server is compared with."""
    if args.stand_in_ms is not None:
        from serve.stand_in import ForwardCost

        cost = ForwardCost(args.stand_in_ms, args.stand_in_row_ms)
        return row_budget / cost.seconds(row_budget), f"the stand-in forward's capacity at {row_budget} rows a batch"
    from nova.loading import load_model

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    model = load_model(args.model_dir, device=None if args.device == "auto" else args.device)
    if args.cuda_graphs:
        model.configure_cuda_graphs(True, max_rows=max(args.encode_batch_sizes))
    for size in args.encode_batch_sizes:  # warm-up: every batch shape's first forward (and graph capture)
        model.encode(sentences, batch_size=size, show_progress=False)
    best, best_size = 0.0, 0
    for size in args.encode_batch_sizes:
        rate = max(in_process(model, sentences, size) for _ in range(2))
        print(f"in-process encode(): batch {size}: {rate:.1f} sentences/s", flush=True)
        if rate > best:
            best, best_size = rate, size
    del model
    return best, f"in-process encode() at its best batch size ({best_size})"


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one here)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny checkpoint, --size)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"],
                        help="random-weight config without --model (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    parser.add_argument("--engine", default=None, choices=["process", "thread"], help="server --engine")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads of the forward, server (--torch-threads) and in-process alike; 1 keeps "
                             "a busy shared machine from spin-waiting (default: torch's own)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the forward replayed through CUDA graphs, server (--cuda-graphs) and in-process alike")
    parser.add_argument("--stand-in-ms", type=float, default=None,
                        help="serve a stand-in forward of this fixed cost per batch (serve/stand_in.py)")
    parser.add_argument("--stand-in-row-ms", type=float, default=0.0, help="the stand-in's cost per row")
    parser.add_argument("--stand-in-launch-ms", type=float, default=0.0,
                        help="the stand-in's host work per launch, holding the GIL (default: %(default)s)")
    parser.add_argument("--stand-in-waits", action="store_true",
                        help="the stand-in's launch waits for its forward (default: queued on an asynchronous device)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="server --max-batch-size, the row budget (default: the server's own)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="server --max-wait-ms")
    parser.add_argument("--http-workers", type=int, default=1, help="server --http-workers (default: %(default)s)")
    parser.add_argument("--start-rate", type=float, default=25.0, help="req/s (default: %(default)s)")
    parser.add_argument("--max-rate", type=float, default=100_000.0, help="req/s (default: %(default)s)")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps past saturation (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per rate (default: %(default)s)")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="seconds to wait for answers after a rate's window (default: %(default)s)")
    parser.add_argument("--client-processes", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--connections", type=int, default=256,
                        help="connections per client process at most (default: %(default)s)")
    parser.add_argument("--closed-loop", default="1,8,32",
                        help="closed-loop client counts for comparison; empty: none (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=512, help="distinct sentences (default: %(default)s)")
    parser.add_argument("--encode-batch-sizes", default="8,16,32,64",
                        help="in-process encode() batch sizes tried (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.encode_batch_sizes = [int(x) for x in args.encode_batch_sizes.split(",") if x]
    closed = [int(x) for x in args.closed_loop.split(",") if x]
    if args.client_processes < 1 or args.start_rate <= 0 or args.duration <= 0:
        parser.error("--client-processes, --start-rate and --duration must be positive")
    if args.url and args.stand_in_ms is not None:
        parser.error("--stand-in-ms starts its own server; it cannot be combined with --url")
    from nova.tiny import ensure_tiny_checkpoint

    args.model_dir = args.model or str(ensure_tiny_checkpoint(size=args.size))
    row_budget = args.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    sentences = make_sentences(args.sentences, seed=1)
    print(f"CPUs: {os.cpu_count()}  model: {args.model_dir}  device: {args.device}  row budget: {row_budget}  "
          f"client processes: {args.client_processes}  {args.duration:g} s per rate", flush=True)

    # a time limit (`timeout`, gpu_run.sh) ends this process with SIGTERM: stop the server and clients first
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, port)
    clients = None
    try:
        wait_healthy(url, server)
        # warm-up: first forwards, and batch shapes up to 64 rows (a GPU's first forward of a shape is slow)
        run_sentence_clients(url, sentences[:256], 64)
        base, base_how = reference(args, sentences, row_budget)
        print(f"reference: {base:.1f} sentences/s, {base_how}", flush=True)
        lone = run_sentence_clients(url, sentences[:32], 1)
        clients = OpenLoopClients(url, sentences, args.client_processes, args.connections)
        print("\nopen loop (Poisson arrivals):", flush=True)
        points = sweep(clients, url, args, server.pid if server else None)
        closed_points = {}
        if closed:
            print(f"\nclosed loop (client threads each waiting for its answer, {args.sentences} requests):")
            print(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>9} {'rows/b':>7} {'busy':>5} {'client CPU':>11}")
        for c in closed:
            before = server_metrics(url)
            result = run_sentence_clients(url, sentences, c, processes=min(c, args.client_processes))
            result.update(server_activity(before, server_metrics(url), result["elapsed_s"]))
            closed_points[c] = result
            print(f"{c:>8} {result['items_per_s']:8.1f} {result['p50_ms']:8.1f} {result['p99_ms']:9.1f} "
                  f"{result['rows_per_batch']:7.1f} {result['model_busy']:5.0%} {result['client_cpu_share']:10.2f}c",
                  flush=True)
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            stop_server(server)

    kept = [p for p in points if p.kept_up] or points
    top = max(points, key=lambda p: p.answered)
    half = min(kept, key=lambda p: abs(p.answered - top.answered / 2))
    print(f"\nsaturation: {top.answered:.1f} answered req/s (offered {top.offered:.1f}) = {top.answered / base:.3f}x "
          f"the reference ({base:.1f}/s, {base_how}); rows per batch {top.rows_per_batch:.1f} = "
          f"{top.rows_per_batch / row_budget:.0%} of the row budget {row_budget}; model busy {top.model_busy:.0%}"
          + (f"; the batcher's lead {top.host_lead_ms:.2f} ms" if top.host_lead_ms is not None else ""))
    print(f"lone request (1 client, p50): {lone['p50_ms']:.1f} ms; p99 at {half.answered:.1f} req/s (about half of "
          f"saturation): {half.p99_ms:.1f} ms = {half.p99_ms / lone['p50_ms']:.2f}x it")
    for c, result in closed_points.items():
        print(f"closed loop, {c} clients: {result['items_per_s']:.1f} req/s = {result['items_per_s'] / base:.3f}x the "
              f"reference; {result['items_per_s'] / top.answered:.3f}x open-loop saturation")
    errors = sum(p.errors for p in points if p.kept_up)
    print(f"HTTP errors at rates the server kept up with: {errors}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"reference": base, "reference_how": base_how, "row_budget": row_budget,
                       "lone_p50_ms": lone["p50_ms"], "open_loop": [asdict(p) for p in points],
                       "closed_loop": closed_points}, fh, indent=2)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
