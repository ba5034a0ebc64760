"""The one-off measurements behind this folder's README (2026-12-03, evening), kept to reproduce them.

    .venv/bin/python bench/results/2026-12-03-cpu-closed-loop/harness.py ratio 512 [SERVER ARGS]
    .venv/bin/python bench/results/2026-12-03-cpu-closed-loop/harness.py lone [SERVER ARGS]
    .venv/bin/python bench/results/2026-12-03-cpu-closed-loop/harness.py cpu-split [SERVER ARGS]
    .venv/bin/python bench/results/2026-12-03-cpu-closed-loop/harness.py spin
    .venv/bin/python bench/results/2026-12-03-cpu-closed-loop/harness.py sweep

- ratio N: 4 rounds of in-process encode() of N sentences at batch 32, then 32 closed-loop client threads
  through the server, then encode() again; the ratio, rows per forward and the mean forward time.
  TREE=/path/to/a/copy runs the server from that tree (an A/B against a changed copy).
- lone: a series of 300 lone requests, then 300 at 32 clients, before and after loading a model here.
- cpu-split: 2,000 sentences at 32 clients; CPU ms per request of each server process and thread, and the
  client's.
- spin: this process's CPU use over a pause right after encode() of one sentence (no server): how long
  OpenMP's workers spin-wait before they sleep.
- sweep: encode() of 256 sentences at batch 4-64 with 1 and 2 torch threads (no server): best of 3.
"""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [os.path.join(ROOT, "bench"), ROOT]

import httpx  # noqa: E402
from bench_server import (  # noqa: E402
    _client_threads,
    free_port,
    in_process,
    make_sentences,
    run_sentence_clients,
    server_metrics,
)

from nova.loading import load_model  # noqa: E402
from nova.tiny import ensure_tiny_checkpoint  # noqa: E402

MODEL = str(ensure_tiny_checkpoint(size="small"))


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "nova.cli", "serve", MODEL, "--port", str(port), "--log-level", "warning",
         "--trust-remote-code", "--max-batch-size", "32", *extra],
        cwd=os.environ.get("TREE", ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        assert server.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def forwards(url: str, run) -> tuple[float, float]:
    """Forwards and model busy seconds during run()."""
    before = server_metrics(url)
    run()
    after = server_metrics(url)
    return (after["nova_model_forwards_total"] - before["nova_model_forwards_total"],
            after["nova_model_busy_seconds_total"] - before["nova_model_busy_seconds_total"])


def ratio(n: int, url: str) -> None:
    model = load_model(MODEL)
    sentences = make_sentences(n, seed=1)
    run_sentence_clients(url, sentences[:64], 8)
    model.encode(sentences, batch_size=32, show_progress=False)
    for _ in range(4):
        a = in_process(model, sentences, 32)
        served: dict = {}
        count, busy = forwards(url, lambda served=served: served.update(run_sentence_clients(url, sentences, 32)))
        b = in_process(model, sentences, 32)
        s = served["items_per_s"]
        print(f"inproc {a:.0f}/{b:.0f}  server {s:.0f}  ratio {2 * s / (a + b):.3f}  rows/fwd {n / count:.1f} "
              f"fwd {busy * 1000 / count:.1f} ms", flush=True)


def lone(url: str) -> None:
    sentences = make_sentences(300, seed=3)

    def measure(label: str, clients: int) -> None:
        timed = {}
        count, busy = forwards(url, lambda: timed.update(_client_threads(url, sentences, clients)))
        wall = timed["ended"] - timed["started"]
        print(f"{label} c{clients}: {len(sentences) / wall:.1f} req/s, {wall * 1000 / len(sentences):.1f} ms/req "
              f"wall, forward {busy * 1000 / count:.1f} ms, rows/fwd {len(sentences) / count:.1f}", flush=True)

    measure("no model here", 1)
    measure("no model here", 32)
    measure("no model here", 32)
    model = load_model(MODEL)
    started = time.perf_counter()
    for sentence in sentences[:100]:
        model.encode([sentence], show_progress=False)
    print(f"in-process lone encode: {(time.perf_counter() - started) * 10:.1f} ms", flush=True)
    measure("model loaded, after encode", 1)
    model.encode(sentences, batch_size=32, show_progress=False)
    measure("model loaded, after encode", 32)
    time.sleep(2)
    measure("model loaded, 2 s after", 1)


def cpu_split(url: str, server: subprocess.Popen) -> None:
    def threads_cpu(pid: int) -> dict:
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                    stat = fh.read()
            except FileNotFoundError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[(tid, stat[stat.index("(") + 1:stat.rindex(")")])] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
        return out

    def tree(pid: int) -> list[int]:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [pid, *[p for kid in kids for p in tree(int(kid))]]

    sentences = make_sentences(2000, seed=3)
    _client_threads(url, sentences[:200], 32)
    pids = tree(server.pid)
    before = {pid: threads_cpu(pid) for pid in pids}
    started, cpu = time.perf_counter(), time.process_time()
    _client_threads(url, sentences, 32)
    wall, client_cpu = time.perf_counter() - started, time.process_time() - cpu
    n = len(sentences)
    print(f"req/s {n / wall:.1f}  client CPU ms/req {client_cpu * 1000 / n:.2f}")
    for pid in pids:
        spent = [(v - before[pid].get(k, 0.0), k[1]) for k, v in threads_cpu(pid).items()]
        print(f"pid {pid}: CPU ms/req {sum(d for d, _ in spent) * 1000 / n:.2f}  "
              + ", ".join(f"{name}:{d * 1000 / n:.2f}" for d, name in sorted(spent, reverse=True) if d > 0.01))


def spin() -> None:
    model = load_model(MODEL)
    sentence = make_sentences(1, seed=1)[0]
    for gap in (0.005, 0.02, 0.05, 0.1, 0.3):
        shares = []
        for _ in range(5):
            model.encode([sentence], show_progress=False)
            cpu = time.process_time()
            time.sleep(gap)
            shares.append((time.process_time() - cpu) / gap)
        print(f"after encode(), a pause of {gap * 1000:.0f} ms: this process used {sorted(shares)[2]:.0%} of one "
              "core over it (median of 5)")


def sweep() -> None:
    import torch

    model = load_model(MODEL)
    sentences = make_sentences(256, seed=1)
    model.encode(sentences[:64], batch_size=32, show_progress=False)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (4, 8, 16, 32, 64):
            print(f"threads {threads} batch {batch:3d}: "
                  f"{max(in_process(model, sentences, batch) for _ in range(3)):6.1f} sentences/s", flush=True)


def main() -> None:
    what, args = sys.argv[1], sys.argv[2:]
    if what in ("spin", "sweep"):
        {"spin": spin, "sweep": sweep}[what]()
        return
    n = int(args.pop(0)) if what == "ratio" else 0
    server, url = start_server(args)
    try:
        if what == "ratio":
            ratio(n, url)
        elif what == "lone":
            lone(url)
        else:
            cpu_split(url, server)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()


if __name__ == "__main__":
    main()
