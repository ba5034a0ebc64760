"""The launching thread's host work per batch when the forward is a CUDA-graph replay, measured on any CPU.

With the text forward replayed from a CUDA graph, what the thread that launches forwards still does per batch
is host work: the prefix cache's lookups and staleness checks, filling the bucket's static buffers, the
pooling and normalization after the replay, the copy of the vectors out, the per-row outcomes. On a GPU that
work, not the forward, bounds a server's batches per second at small batch sizes, and it holds the GIL.

This measures it without a GPU: the model is the 3B shape's depth (36 text layers) at the tiny width, with
three random rank-32 adapters; the CUDA-graph bucket path runs on its static buffers
(`configure_cuda_graphs(True, capture=False)`), and once a bucket exists its forward is replaced by a replay
that costs nothing (the outputs of one eager run, handed back as `CUDAGraph.replay()` leaves them), so what
is timed is everything but the forward. A real replay adds one `cudaGraphLaunch` (microseconds). Beside it:
the same batch through the eager forward, whose host work a GPU pays in launches. Batches arrive collated,
as the server's model process gets them (collation runs on its receive thread); `collate` is timed apart.
On a CPU the device's own work outside the graph runs on this thread too: for a prefix bucket, zeroing its
static buffer and copying the prefixes in (14 MB at 36 layers here; a GPU's launching thread only queues
both). Column `host` skips that memory work (the buffer shrunk to one slot, the copies not made): the
launching thread's own work, what a GPU host pays.

It prints, per case, µs of the calling thread's CPU per batch (medians of alternating rounds) and the torch
operations dispatched outside the graph.

    .venv/bin/python bench/bench_replay_host.py
    .venv/bin/python bench/bench_replay_host.py --layers 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


class FreeReplay:
    """Stands in for a captured `torch.cuda.CUDAGraph`: replaying it costs nothing (the outputs stay as the
    one eager run left them, as a real replay leaves them in the graph's output tensors)."""

    def replay(self) -> None:
        pass


@contextlib.contextmanager
def without_prefix_buffer_work(bucket, prefixes_type):
    """A prefix bucket's zeroing and copies made (almost) free: its buffer one slot wide, no copy into it."""
    if bucket.prefix_kv is None:
        yield
        return
    buffer, copy_into = bucket.prefix_kv, prefixes_type.copy_into
    bucket.prefix_kv, prefixes_type.copy_into = buffer[..., :1, :], lambda self, into: None
    try:
        yield
    finally:
        bucket.prefix_kv, prefixes_type.copy_into = buffer, copy_into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36, help="text layers (default: %(default)s, the 3B shape's)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=20, help="batches per round and path (default: %(default)s)")
    args = parser.parse_args()
    import torch
    from bench_ops import VIEWS
    from bench_pipe import cpu_us
    from gpu_check import INSTRUCTION, QUERIES, random_model

    from nova.op_count import count_ops

    torch.set_num_threads(1)
    model = random_model(torch.device("cpu"), "tiny", layers=args.layers)
    model.configure_cuda_graphs(True, capture=False)
    graphs = model.cuda_graphs
    queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)]} for i in range(32)]
    adapters = ["retrieval", "text-matching", "code"]
    cases = {
        "bs=32": queries,
        "three adapters, bs=16": [dict(queries[i], adapter=adapters[i % 3]) for i in range(16)],
        "bs=32, one instruction (cached)": [dict(q, instructions=INSTRUCTION) for q in queries],
        "bs=32, three instructions (cached)": [dict(q, instructions=f"{INSTRUCTION} ({i % 3})")
                                               for i, q in enumerate(queries)],
    }
    print(f"{args.layers} text layers, tiny width, one torch thread; µs of the launching thread's CPU per batch "
          f"(medians of {args.rounds} rounds of {args.calls}), torch operations outside the graph")
    print(f"{'case':36s} {'replayed':>9s} {'host':>6s} {'eager':>8s} {'collate':>8s}   "
          f"{'ops replayed (non-view)':>24s}  ops eager")
    for label, items in cases.items():
        rows = [model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
        collated = model.collate_rows(rows)

        def launch(rows=rows, collated=collated):
            return model.launch_prepared(rows, False, collated).result()

        graphs.configure(True, capture=False)  # drops the buckets so far: this batch's will be the only one
        launch()  # fills the prefix cache and makes the batch's bucket
        (bucket,) = graphs._forwards.values()
        with torch.inference_mode():  # its forward, run once, becomes a free replay
            bucket.outputs = bucket.forward(model)
        bucket.graph = FreeReplay()
        replays_before = graphs.stats.replays
        launch()
        if graphs.stats.replays != replays_before + 1:
            raise SystemExit(f"{label}: the batch did not go through a bucket")
        prefixes_type = type(model.prefix_states(collated.rows, collated.adapters))
        replayed, eager, collate, host = [], [], [], []
        for _ in range(args.rounds):
            with without_prefix_buffer_work(bucket, prefixes_type):
                host.append(cpu_us(launch, args.calls))
            replayed.append(cpu_us(launch, args.calls))
            graphs.enabled = False  # not configure(): that would drop the buckets
            eager.append(cpu_us(launch, max(args.calls // 4, 1)))
            graphs.enabled = True
            collate.append(cpu_us(lambda rows=rows: model.collate_rows(rows), args.calls))
        ops_replayed = count_ops(launch)
        graphs.enabled = False
        ops_eager = sum(count_ops(launch).values())
        graphs.enabled = True
        kernels = sum(n for name, n in ops_replayed.items() if name not in VIEWS)
        print(f"{label:36s} {statistics.median(replayed):9.0f} {statistics.median(host):6.0f} "
              f"{statistics.median(eager):8.0f} {statistics.median(collate):8.0f}   "
              f"{sum(ops_replayed.values()):15d} ({kernels:4d})  {ops_eager:9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
