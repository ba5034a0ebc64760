"""Host cost of a batch crossing the pipe between the server process and its model process: the request
(the batch's `EmbeddingRow`s) and the reply (`BatchResult`: one vector per row), each pickled on one side
and unpickled on the other. The reply is timed as it travels (`BatchResult.__reduce__`: vectors of one shape
as one array) and as it would travel with an array per row, in alternating rounds of one run; it prints
microseconds per batch and their ratio. Then the rest of the model process's host work on a request before
its forward: collating it (`collate_rows`), without and with an instruction (whose cached prefix is left out),
in CPU time of the calling thread (time the machine's other tenants take from it does not count).

These costs are paid on the threads that also launch forwards (the model process) and run the event loop
(the server process): on a GPU with a forward of a few milliseconds, every tenth of a millisecond here is a
share of the model's time.

    .venv/bin/python bench/bench_pipe.py --rows 64
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def round_trip_us(value, repeats: int) -> tuple[float, float]:
    """(dumps, loads) microseconds per call, as the pipe pickles (highest protocol)."""
    started = time.perf_counter()
    for _ in range(repeats):
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter()
    for _ in range(repeats):
        pickle.loads(payload)
    done = time.perf_counter()
    return (dumped - started) / repeats * 1e6, (done - dumped) / repeats * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per batch (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=2048, help="pooled vector size (default: %(default)s, 3B's)")
    parser.add_argument("--repeats", type=int, default=200, help="calls per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np

    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint
    from serve.rows import BatchResult, EmbeddingRow

    model = load_model(str(ensure_tiny_checkpoint()), trust_remote_code=True)
    processor = model.processor
    words = "rivers mountains planets violins engines gardens castles oceans forests deserts harbors".split()
    sentences = [" ".join(words[(i + j) % len(words)] for j in range(15)) for i in range(args.rows)]
    rows = [EmbeddingRow.of(processor.prepare_item(sentence, index=0), multivector=False, dimensions=None)
            for sentence in sentences]
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.dim).astype(np.float32) for _ in range(args.rows)]
    reply = (0, True, BatchResult(vectors, 0.001, 0.005), None)
    per_row = (0, True, (vectors, 0.001, 0.005, None), None)  # the same reply with an array per row
    cases = {"request (rows)": ("embed", 0, rows), "reply, one array": reply, "reply, array per row": per_row}
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, value in cases.items():
            timings[name].append(round_trip_us(value, args.repeats))
    print(f"{args.rows} rows of ~15-word sentences, pooled vectors of {args.dim} float32; medians of "
          f"{args.rounds} alternating rounds of {args.repeats} calls")
    print(f"{'':24} {'dumps us':>9} {'loads us':>9} {'bytes':>9}")
    medians = {}
    for name, value in cases.items():
        dumps = statistics.median(t[0] for t in timings[name])
        loads = statistics.median(t[1] for t in timings[name])
        medians[name] = dumps + loads
        size = len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        print(f"{name:24} {dumps:9.1f} {loads:9.1f} {size:9d}")
    print(f"reply, one array / array per row (dumps + loads): "
          f"{medians['reply, one array'] / medians['reply, array per row']:.2f}x")
    instructed = [processor.prepare_item(sentence, index=i,
                                         instructions="Represent the query for retrieving relevant passages")
                  for i, sentence in enumerate(sentences)]
    batches = {"collate_rows, plain": [row.prepared for row in rows], "collate_rows, instructed": instructed}
    collations: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(args.rounds):
        for name, items in batches.items():
            started = time.thread_time()
            for _ in range(args.repeats):
                model.collate_rows(items)
            collations[name].append((time.thread_time() - started) / args.repeats * 1e6)
    for name in batches:
        print(f"{name:24} {statistics.median(collations[name]):9.1f} us of CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
