"""Server benchmark: `nova serve` vs in-process `encode()` on the same inputs, from ONE run (these machines
are noisy: compare ratios measured together, never numbers from different runs). Both are loaded at once
and measured back to back in interleaved rounds; every ratio is computed inside one round (numerator and
denominator measured seconds apart) and the median over rounds is printed, so a burst of load from
another process spoils one round, not one side of a ratio.

Prints, on a mid-size random-weight config (`nova.tiny` size "small" unless --model is given):
- server throughput at 1 / 8 / 32 concurrent clients as a ratio of in-process encode() throughput,
  with p50 / p99 request latency;
- mixed-adapter (three real adapters, every row on one) vs single-adapter batches (server and in-process);
- with vs without instructions (server and in-process).

`--mode sentences` measures the way most clients call an embedding server: one ~15-word sentence per
request in the plain OpenAI form (a RAG query, the OpenAI SDK in a loop), from 1 / 8 / 32 client threads
(threads + httpx); it prints throughput as a ratio of in-process encode() of the same sentences, the server's
CPU milliseconds per request beyond what encode() spends per sentence (from the server process's CPU time,
which does not depend on the client) and split between the HTTP process and the model process, the load
generator's own CPU use, and a lone request's latency next to encode() of that one sentence, measured in pairs
(through httpx, and through curl where it is installed). Each side is measured after the other side's OpenMP
workers have stopped spin-waiting (`settle()`).

Both modes also print, from the server's /metrics: rows per batch, where a request's time goes (preparation,
queue, inference, rendering), the share of the wall time the model spent in forwards, and the batch cost the
server fitted (which decides whether it splits batches by length).

The server runs in its own process (as in production); clients are in this process and ask for base64 like
the official OpenAI SDK. Usage:

    .venv/bin/python bench/bench_server.py                       # CPU, small config, 4 items per request
    .venv/bin/python bench/bench_server.py --mode sentences      # one sentence per request
    .venv/bin/python bench/bench_server.py --per-request 1       # one Nova item per request
    .venv/bin/python bench/bench_server.py --engine thread       # the model on the server's own threads
    .venv/bin/python bench/bench_server.py --items 2048 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The mixed case cycles through three real adapters: a row without an adapter costs less, so mixing in
# "none" rows would flatter the mixed figure.
ADAPTERS = ["retrieval", "text-matching", "code"]
TASK_OF = {"retrieval": "retrieval.passage", "text-matching": "text-matching", "code": "code.passage"}
INSTRUCTIONS = ["Retrieve passages that answer the question", "Find semantically similar sentences",
                "Retrieve code that implements the described function"]


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("embedding server batch token adapter vector query passage retrieval model request latency "
             "throughput image text code python function returns sorted list of numbers cosine").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 96))) for _ in range(n)]


def make_items(texts: list[str], *, mixed_adapters: bool, instructions: bool) -> list[dict]:
    items = []
    for i, text in enumerate(texts):
        adapter = ADAPTERS[i % len(ADAPTERS)] if mixed_adapters else "retrieval"
        item = {"text": text, "task": TASK_OF[adapter], "adapter": adapter}
        if instructions:
            item["instructions"] = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        items.append(item)
    return items


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# OpenMP's workers (libgomp, torch's CPU backend) spin-wait after each parallel region before they sleep: after
# an encode() of one sentence its process burns about 7 ms of CPU over the next 20 ms (measured on the 2-core
# sandbox, bench/results/2026-12-03-cpu-closed-loop/README.md).
SPIN_SETTLE_S = 0.05


def settle() -> None:
    """Wait out the last run's spinning OpenMP workers before the other side runs: with as many cores as threads,
    a figure taken right after the other side's run carries the other side's spin-waits. Every measurement here
    that follows a run of the other side (in-process, or the server's model process) starts with it."""
    time.sleep(SPIN_SETTLE_S)


def in_process(model, items: list[dict], batch_size: int) -> float:
    """items/s of model.encode() on `items`."""
    settle()
    started = time.perf_counter()
    model.encode(items, batch_size=batch_size, show_progress=False)
    return len(items) / (time.perf_counter() - started)


async def run_clients(url: str, items: list[dict], concurrency: int, per_request: int) -> dict:
    requests = [items[i : i + per_request] for i in range(0, len(items), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)
    latencies: list[float] = []
    errors = 0

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            response = await http.post("/v1/embeddings", json={"input": req, "encoding_format": "base64"})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"items_per_s": len(items) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "elapsed_s": elapsed}


def make_sentences(n: int, seed: int) -> list[str]:
    """~15-word sentences (13-17 words), like RAG queries."""
    rng = random.Random(seed)
    words = ("how does the embedding server batch token requests for a retrieval model with adapters and "
             "what latency should a client expect when the query is short and the corpus is large").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(13, 17))) + "?" for _ in range(n)]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, all its threads, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server: its process and its children (the model's engine process), all
    their threads, from /proc."""
    return sum(process_cpu_seconds(proc) for proc in [pid, *_children(pid)])


def server_metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples (name with labels -> value)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def server_summary(url: str) -> str:
    """What the server's batcher did over the whole run: batches, rows per batch, mean forward time, and the
    cost it fitted (which decides whether it splits batches by length)."""
    v = server_metrics(url)
    forwards = max(v["nova_model_forwards_total"], 1e-9)
    terms = {term: v.get('nova_batch_cost_seconds{term="' + term + '"}') for term in ("fixed", "per_token", "per_adapter")}
    fit = ", ".join(f"{term} {value * 1e3:.4g} ms" for term, value in terms.items() if value is not None)
    lead = v.get("nova_batcher_host_lead_seconds")
    return (f"server over the run: {v['nova_model_forwards_total']:.0f} forwards, {v['nova_batch_rows_sum'] / forwards:.1f} "
            f"rows/forward, {v['nova_model_busy_seconds_total'] / forwards * 1e3:.1f} ms per forward; "
            f"fitted cost: {fit or 'none (nothing is split)'}"
            + (f"; the batcher's lead (preparation, and a launch ahead of a device): {lead * 1e3:.2f} ms"
               if lead is not None else ""))


STAGES = (("prep", "nova_request_preparation_seconds"), ("queue", "nova_queue_wait_seconds"),
          ("inference", "nova_request_inference_seconds"), ("render", "nova_request_rendering_seconds"))


def server_activity(before: dict[str, float], after: dict[str, float], wall_seconds: float) -> dict[str, float]:
    """What the server did between two /metrics snapshots: rows per batch (whether batches form at all: the
    first thing to look at when a ratio is low), the mean of each request stage in ms (preparation, a row's
    queue wait, inference = queue + batch + model, rendering), and the share of the wall time the model spent
    in forwards (below 1 with requests waiting elsewhere: the model idles)."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    # per forward: with several HTTP workers, their batches may run as one forward
    forwards = max(delta("nova_model_forwards_total"), 1e-9)
    out = {"rows_per_batch": delta("nova_batch_rows_sum") / forwards,
           "model_busy": delta("nova_model_busy_seconds_total") / wall_seconds,
           "model_thread_cpu_ms": delta("nova_model_thread_cpu_seconds_total") / forwards * 1000}
    for stage, metric in STAGES:
        out[f"{stage}_ms"] = delta(f"{metric}_sum") / max(delta(f"{metric}_count"), 1.0) * 1000
    return out


def measured(url: str, run) -> dict:
    """`run()` (a client run returning its figures and `elapsed_s`, its own timed window) with the server's
    activity during it added. The model's busy share is over that window: every forward of the run falls in
    it, while the snapshots also enclose the clients' set-up (32 threads building httpx clients), which would
    understate the share by half or more when a forward is short beside that set-up."""
    before = server_metrics(url)
    result = run()
    result.update(server_activity(before, server_metrics(url), result["elapsed_s"]))
    return result


def print_stages(rounds: list[dict], keys: list[tuple[int, str]]) -> None:
    print(f"where a request's time goes in the server (mean ms; queue is per row) and the model's busy share:\n"
          f"{'clients':>8} {'prep':>7} {'queue':>7} {'inference':>10} {'render':>7} {'model busy':>11}")
    for c, key in keys:
        med = lambda field, key=key: float(np.median([r[key][field] for r in rounds]))  # noqa: E731
        print(f"{c:>8} {med('prep_ms'):7.2f} {med('queue_ms'):7.2f} {med('inference_ms'):10.2f} {med('render_ms'):7.2f} "
              f"{med('model_busy'):10.0%}")


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids = [int(k) for k in fh.read().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


def run_sentence_clients(url: str, sentences: list[str], concurrency: int, processes: int = 1) -> dict:
    """One sentence per request, plain OpenAI form, from `concurrency` threads with one httpx client each, in
    `processes` client processes (threads split evenly; 1: this process).

    Each thread builds its client and opens its connection before the clock starts, as an application does
    once (building an httpx.Client costs milliseconds of CPU: timed, it would be the client's cost, not the
    server's, and with a few requests per thread it would dominate this measurement).
    Several processes: one Python process of client threads shares one GIL, which on a GPU's throughput
    (thousands of requests a second) can pace the run instead of the server; the processes start their
    clocks together and the run lasts from the first start to the last end."""
    settle()
    if processes == 1:
        timed = _client_threads(url, sentences, concurrency)
    else:
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=_client_process, args=(
            url, sentences[i::processes], len(range(i, concurrency, processes)), start, results))
            for i in range(processes)]
        for worker in workers:
            worker.start()
        parts = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
        timed = {"latencies": [x for part in parts for x in part["latencies"]],
                 "errors": sum(part["errors"] for part in parts),
                 "started": min(part["started"] for part in parts), "ended": max(part["ended"] for part in parts),
                 "cpu_s": sum(part["cpu_s"] for part in parts)}
    elapsed = timed["ended"] - timed["started"]
    lat = np.array(timed["latencies"]) * 1000
    # The load generator's own CPU (its processes run nothing else meanwhile): one Python process of client
    # threads shares one GIL, so past about 1000 ms of CPU per second it, not the server, sets the pace.
    client_cpu_ms = timed["cpu_s"] * 1000
    return {"items_per_s": len(sentences) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": timed["errors"],
            "client_cpu_ms": client_cpu_ms / len(sentences), "client_cpu_share": client_cpu_ms / 1000 / elapsed,
            "elapsed_s": elapsed}


def _client_process(url: str, sentences: list[str], concurrency: int, start, results) -> None:
    results.put(_client_threads(url, sentences, concurrency, start))


def _client_threads(url: str, sentences: list[str], concurrency: int, start=None) -> dict:
    """`concurrency` client threads of this process through `sentences`; `start`, a barrier shared with
    other client processes, starts the clocks together. Returns latencies (s), errors, the timed window
    (perf_counter: one clock for every process) and this process's CPU seconds within it."""
    lock = threading.Lock()
    pending = list(range(len(sentences)))
    latencies: list[float] = []
    errors = [0]
    built, go = threading.Barrier(concurrency + 1), threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            http.get("/health")
            built.wait()
            go.wait()
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop()
                started = time.perf_counter()
                response = http.post("/v1/embeddings", json={"input": sentences[i], "encoding_format": "base64"})
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    errors[0] += response.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    built.wait()
    if start is not None:
        start.wait()
    started, cpu = time.perf_counter(), time.process_time()
    go.set()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors[0], "started": started, "ended": time.perf_counter(),
            "cpu_s": time.process_time() - cpu}


def curl_ms(url: str, sentence: str) -> float:
    """curl's own `time_total` for one request (a new connection, as curl makes): the lone request as a shell
    script or a client without connection reuse sees it, without httpx's own cost in Python."""
    body = json.dumps({"input": sentence, "encoding_format": "base64"})
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", "-H",
                           "Content-Type: application/json", "-d", body, url + "/v1/embeddings"],
                          capture_output=True, text=True, check=True)
    return float(done.stdout) * 1000


def lone_pairs(url: str, model, sentences: list[str]) -> dict:
    """A lone request next to `encode()` of the same sentence, measured in pairs: each sentence is sent alone
    (httpx on an open connection, then curl where it is installed), then encoded in process, one right after
    the other (each after `settle()`); the figures are medians of the per-pair differences. (Medians of two
    separate series, taken a minute apart, moved by +-0.5 ms with this machine's load: as much as what they
    compared.)"""
    curl = shutil.which("curl") is not None
    httpx_ms, curl_ms_, encode_ms = [], [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        http.get("/health")
        for sentence in sentences:
            settle()
            started = time.perf_counter()
            response = http.post("/v1/embeddings", json={"input": sentence, "encoding_format": "base64"})
            httpx_ms.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            if curl:
                settle()
                curl_ms_.append(curl_ms(url, sentence))
            settle()
            started = time.perf_counter()
            model.encode([sentence], show_progress=False)
            encode_ms.append((time.perf_counter() - started) * 1000)
    out = {"encode_ms": statistics.median(encode_ms), "httpx_ms": statistics.median(httpx_ms),
           "httpx_over_ms": statistics.median(h - e for h, e in zip(httpx_ms, encode_ms, strict=True))}
    if curl:
        out["curl_ms"] = statistics.median(curl_ms_)
        out["curl_over_ms"] = statistics.median(c - e for c, e in zip(curl_ms_, encode_ms, strict=True))
    return out


def sentence_rounds(url: str, pid: int, model, sentences: list[str], batch_size: int, rounds: int,
                    client_processes: int = 1) -> list[dict]:
    out = []
    for round_ in range(rounds):
        r: dict = {}
        cpu = time.process_time()
        r["inproc"] = in_process(model, sentences, batch_size)
        r["inproc_cpu_ms"] = (time.process_time() - cpu) * 1000 / len(sentences)
        for c in (1, 8, 32):
            before, before_http = server_cpu_seconds(pid), process_cpu_seconds(pid)
            r[f"server_c{c}"] = measured(
                url, lambda c=c: run_sentence_clients(url, sentences, c, processes=min(c, client_processes)))
            r[f"server_c{c}"]["cpu_ms"] = (server_cpu_seconds(pid) - before) * 1000 / len(sentences)
            # with one HTTP worker (the default) the server's own process is the HTTP side, its child the model
            r[f"server_c{c}"]["http_cpu_ms"] = (process_cpu_seconds(pid) - before_http) * 1000 / len(sentences)
        r["lone"] = lone_pairs(url, model, sentences[:48])
        r["inproc_2"] = in_process(model, sentences, batch_size)
        out.append(r)
        print(f"round {round_ + 1}/{rounds}: in-process {r['inproc']:.1f} / {r['inproc_2']:.1f} sentences/s, "
              f"server c32 {r['server_c32']['items_per_s']:.1f}", flush=True)
    return out


def report_sentences(rounds: list[dict]) -> int:
    def median(values):
        return float(np.median(values))

    def fmt(values):
        return f"{median(values):.3f} (rounds {min(values):.2f}-{max(values):.2f})"

    base = [(r["inproc"] + r["inproc_2"]) / 2 for r in rounds]
    print(f"\nin-process encode(): {median(base):.1f} sentences/s median, {median([r['inproc_cpu_ms'] for r in rounds]):.2f} "
          "CPU ms per sentence")
    print(f"{'clients':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'CPU ms/req':>11} {'rows/batch':>10} "
          f"{'client CPU':>11}   ratio vs in-process (median, range)")
    for c in (1, 8, 32):
        key = f"server_c{c}"
        ratios = [r[key]["items_per_s"] / b for r, b in zip(rounds, base, strict=True)]
        print(f"{c:>8} {median([r[key]['items_per_s'] for r in rounds]):9.1f} {median([r[key]['p50_ms'] for r in rounds]):9.1f} "
              f"{median([r[key]['p99_ms'] for r in rounds]):9.1f} {median([r[key]['cpu_ms'] for r in rounds]):11.2f} "
              f"{median([r[key]['rows_per_batch'] for r in rounds]):10.1f} "
              f"{median([r[key]['client_cpu_share'] for r in rounds]):10.2f}c   {fmt(ratios)}")
    print_stages(rounds, [(c, f"server_c{c}") for c in (1, 8, 32)])
    beyond = [r["server_c32"]["cpu_ms"] - r["inproc_cpu_ms"] for r in rounds]
    print(f"server CPU ms per request beyond encode()'s per sentence (32 clients): {median(beyond):.2f} "
          f"(rounds {min(beyond):.2f}-{max(beyond):.2f})")
    c32 = [r["server_c32"] for r in rounds]
    http = median([x["http_cpu_ms"] for x in c32])
    print(f"CPU ms per request at 32 clients: HTTP process {http:.2f}, model process "
          f"{median([x['cpu_ms'] for x in c32]) - http:.2f} (encode() at batch 32: "
          f"{median([r['inproc_cpu_ms'] for r in rounds]):.2f} per sentence), clients "
          f"{median([x['client_cpu_ms'] for x in c32]):.2f}")
    lone = [r["lone"] for r in rounds]
    print(f"lone request (a sentence alone, then encode() of it, in pairs; medians): encode() "
          f"{median([x['encode_ms'] for x in lone]):.1f} ms; httpx {median([x['httpx_ms'] for x in lone]):.1f} ms, "
          f"{fmt([x['httpx_over_ms'] for x in lone])} ms over it", end="")
    if all("curl_ms" in x for x in lone):
        print(f"; curl (a new connection each) {median([x['curl_ms'] for x in lone]):.1f} ms, "
              f"{fmt([x['curl_over_ms'] for x in lone])} ms over it", end="")
    print("  (target: at most 3 ms over it)")
    ratios = [r["server_c32"]["items_per_s"] / b for r, b in zip(rounds, base, strict=True)]
    print(f"server at 32 clients / in-process: {fmt(ratios)}  (goal >= 0.6; Infinity, measured the same way: 0.44)")
    errors = sum(r[f"server_c{c}"]["errors"] for r in rounds for c in (1, 8, 32))
    print(f"HTTP errors: {errors}")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the 'small' random config)")
    parser.add_argument("--items", type=int, default=256, help="items per measurement (default: %(default)s)")
    parser.add_argument("--per-request", type=int, default=4,
                        help="items per HTTP request; with 1, 32 clients never have more than 32 rows in flight, so "
                             "the server cannot sort by length the way encode() does (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="in-process encode() batch size (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="server --max-wait-ms (default: the server's own default)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads for the model on both sides (in-process and the server, through "
                             "OMP_NUM_THREADS); 1 keeps a busy shared machine from spin-waiting (default: torch's own)")
    parser.add_argument("--server-torch-threads", type=int, default=None,
                        help="server --torch-threads only (the in-process side keeps --torch-threads or torch's "
                             "default) (default: the same as the in-process side)")
    parser.add_argument("--engine", choices=["auto", "process", "thread"], default="auto",
                        help="server --engine: the model in its own process or on the server's threads "
                             "(default: %(default)s, the server's own default)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=0,
                        help="both sides: batches' padded length rounded up to a multiple of it (default: "
                             "%(default)s = the model's own: 16 on CUDA, 1 on CPU)")
    parser.add_argument("--mode", choices=["items", "sentences"], default="items",
                        help="items: Nova items, --per-request per request; sentences: one sentence per request, "
                             "plain OpenAI form (default: %(default)s)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="--mode sentences: client threads split over this many processes, so that one "
                             "process's GIL does not pace the run on a fast device (default: %(default)s)")
    args = parser.parse_args()
    if args.client_processes != 1 and args.mode != "sentences":
        parser.error("--client-processes applies to --mode sentences only")
    if args.client_processes < 1:
        parser.error("--client-processes must be at least 1")

    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the server process inherits it
        import torch

        torch.set_num_threads(args.torch_threads)
    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint

    model_dir = args.model or str(ensure_tiny_checkpoint(size="small"))
    device = None if args.device == "auto" else args.device
    model = load_model(model_dir, device=device)
    model.pad_to_multiple_of = args.pad_to_multiple_of or None
    import torch

    print(f"torch threads: {torch.get_num_threads()}  CPUs: {os.cpu_count()}")
    print(f"model: {model_dir}  device: {model.device}  dtype: {model.dtype}  "
          f"hidden: {model.config.text_config.hidden_size}  layers: {model.config.text_config.num_hidden_layers}")

    texts = make_texts(args.items, seed=0)
    single = make_items(texts, mixed_adapters=False, instructions=False)
    mixed = make_items(texts, mixed_adapters=True, instructions=False)
    instructed = make_items(texts, mixed_adapters=False, instructions=True)
    # warm-up over every length: on a GPU the first batch of a shape is several times slower than the next
    # (bench/results/2026-11-27-h100/README.md), which a cold in-process side would pay inside its ratio
    model.encode(single, batch_size=args.batch_size)
    model.encode(instructed, batch_size=args.batch_size)

    results: dict = {"model": model_dir, "device": str(model.device), "items": args.items}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nova.cli", "serve", model_dir, "--trust-remote-code", "--port", str(port),
           *(["--max-wait-ms", str(args.max_wait_ms)] if args.max_wait_ms is not None else []),
           "--max-batch-size", str(args.batch_size),
           "--max-client-batch-size", str(max(32, args.per_request)), "--log-level", "warning",
           "--device", args.device, "--engine", args.engine, "--pad-to-multiple-of", str(args.pad_to_multiple_of),
           *(["--torch-threads", str(args.server_torch_threads)] if args.server_torch_threads else [])]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if server.poll() is not None:
                print(server.stderr.read(), file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        asyncio.run(run_clients(url, single[:64], 8, args.per_request))  # warm-up
        if args.mode == "sentences":
            sentences = make_sentences(args.items, seed=1)
            run_sentence_clients(url, sentences[:64], 8)  # warm-up
            model.encode(sentences, batch_size=args.batch_size)
            rounds = sentence_rounds(url, server.pid, model, sentences, args.batch_size, args.rounds,
                                     args.client_processes)
            results["rounds"] = rounds
            errors = report_sentences(rounds)
            print(server_summary(url))
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(results, fh, indent=2)
            return 0 if errors == 0 else 1

        rounds = []
        for round_ in range(args.rounds):
            r: dict = {}
            r["inproc_single"] = in_process(model, single, args.batch_size)
            for c in (1, 8, 32):
                r[f"server_single_c{c}"] = measured(
                    url, lambda c=c: asyncio.run(run_clients(url, single, c, args.per_request)))
            r["inproc_mixed"] = in_process(model, mixed, args.batch_size)
            r["server_mixed_c32"] = asyncio.run(run_clients(url, mixed, 32, args.per_request))
            r["inproc_instructed"] = in_process(model, instructed, args.batch_size)
            r["server_instructed_c32"] = asyncio.run(run_clients(url, instructed, 32, args.per_request))
            r["inproc_single_2"] = in_process(model, single, args.batch_size)
            rounds.append(r)
            print(f"round {round_ + 1}/{args.rounds}: in-process {r['inproc_single']:.1f} / "
                  f"{r['inproc_single_2']:.1f} items/s, server c32 {r['server_single_c32']['items_per_s']:.1f}",
                  flush=True)
        results["rounds"] = rounds
        summary = server_summary(url)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    def ips(value):
        return value["items_per_s"] if isinstance(value, dict) else value

    def ratio(num: str, den: str) -> tuple[float, float, float]:
        values = []
        for r in rounds:
            denominator = ips(r[den])
            if den == "inproc_single":  # the in-process run on either side of the server runs
                denominator = (ips(r["inproc_single"]) + ips(r["inproc_single_2"])) / 2
            values.append(ips(r[num]) / denominator)
        return float(np.median(values)), min(values), max(values)

    def fmt(t):
        return f"{t[0]:.3f} (rounds {t[1]:.2f}-{t[2]:.2f})"

    base = float(np.median([(ips(r["inproc_single"]) + ips(r["inproc_single_2"])) / 2 for r in rounds]))
    print(f"\nin-process encode(): {base:.1f} items/s median (single adapter, batch_size={args.batch_size}, "
          f"{args.items} items, {args.rounds} rounds)")
    print(f"{'clients':>8} {'items/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'rows/batch':>10}   "
          "ratio vs in-process (median, range)")
    for c in (1, 8, 32):
        key = f"server_single_c{c}"
        med = lambda field, key=key: float(np.median([r[key][field] for r in rounds]))  # noqa: E731
        print(f"{c:>8} {med('items_per_s'):9.1f} {med('p50_ms'):9.1f} {med('p99_ms'):9.1f} {med('rows_per_batch'):10.1f}   "
              f"{fmt(ratio(key, 'inproc_single'))}")
    print_stages(rounds, [(c, f"server_single_c{c}") for c in (1, 8, 32)])
    print(f"\nmixed-adapter / single-adapter (32 clients): server {fmt(ratio('server_mixed_c32', 'server_single_c32'))}"
          f"   in-process {fmt(ratio('inproc_mixed', 'inproc_single'))}")
    print(f"with / without instructions (32 clients):   server "
          f"{fmt(ratio('server_instructed_c32', 'server_single_c32'))}   in-process "
          f"{fmt(ratio('inproc_instructed', 'inproc_single'))}   (items/s; instructions add tokens)")
    print(f"server at 32 clients / in-process: {fmt(ratio('server_single_c32', 'inproc_single'))}  (target >= 0.95)")
    print(f"mixed-adapter / single-adapter, server:    {fmt(ratio('server_mixed_c32', 'server_single_c32'))}"
          "  (target >= 0.95)")
    print(summary)
    errors = sum(v["errors"] for r in rounds for k, v in r.items() if k.startswith("server_"))
    print(f"HTTP errors: {errors}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
