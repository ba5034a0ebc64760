"""A one-sentence forward in `nova serve`'s model process, before and after the server has answered Nova items
of 8-96 words, 4 per request, from 8 concurrent clients (bench_server.py's warm-up), with the CPU share of each
model-process thread over each run. TREE=/path/to/a/copy runs the server from that tree.

    .venv/bin/python bench/results/2026-12-03-openmp-teams/warmup_forward.py
"""

import asyncio
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [os.path.join(ROOT, "bench"), os.path.join(ROOT, "bench", "results", "2026-12-03-cpu-closed-loop"), ROOT]

from bench_server import _children, _client_threads, make_items, make_sentences, make_texts, run_clients  # noqa: E402
from harness import forwards, start_server  # noqa: E402


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> None:
    server, url = start_server([])
    try:
        model_pid = next(k for k in _children(server.pid) if len(os.listdir(f"/proc/{k}/task")) > 1)
        sentences = make_sentences(300, seed=3)

        def one_client(label: str) -> None:
            before, timed = thread_cpu(model_pid), {}
            count, busy = forwards(url, lambda: timed.update(_client_threads(url, sentences, 1)))
            after, wall = thread_cpu(model_pid), timed["ended"] - timed["started"]
            shares = sorted((round((after[t] - before.get(t, 0.0)) / wall, 2) for t in after), reverse=True)
            print(f"{label}: {len(sentences) / wall:.1f} req/s, forward {busy * 1000 / count:.1f} ms; model-process "
                  f"threads' CPU share (largest first): {[s for s in shares if s > 0.01]}; "
                  f"threads: {len(os.listdir(f'/proc/{model_pid}/task'))}", flush=True)

        one_client("fresh")
        items = make_items(make_texts(64, seed=0), mixed_adapters=False, instructions=False)
        asyncio.run(run_clients(url, items, 8, 4))
        one_client("after the item warm-up")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
