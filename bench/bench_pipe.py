"""Host cost of a batch crossing the pipe between the server process and its model process, and of the model
process's work on it before its forward, in alternating rounds of one run.

The request: the batch's rows as they travel (`PackedRows`: columns, the token fields of all rows one array
each) against an object per row (`EmbeddingRow`s pickled as they are), each side's whole host work in CPU
time of the calling thread (time the machine's other tenants take from it does not count): the server
process packs and pickles; the model process unpickles, unpacks and collates (`collate_rows`, whose token
fields are then views of the arrays), without and with an instruction (whose cached prefix is left out).
The reply (`BatchResult`: one vector per row) is timed as it travels (`BatchResult.__reduce__`: vectors of
one shape as one array) and as it would travel with an array per row. It prints microseconds per batch and
the ratios.

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


def cpu_us(work, repeats: int) -> float:
    """Microseconds of this thread's CPU time per call of `work`."""
    started = time.thread_time()
    for _ in range(repeats):
        work()
    return (time.thread_time() - started) / repeats * 1e6


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
    from serve.rows import BatchResult, EmbeddingRow, PackedRows

    model = load_model(str(ensure_tiny_checkpoint()), trust_remote_code=True)
    processor = model.processor
    words = "rivers mountains planets violins engines gardens castles oceans forests deserts harbors".split()
    sentences = [" ".join(words[(i + j) % len(words)] for j in range(15)) for i in range(args.rows)]
    instruction = "Represent the query for retrieving relevant passages"
    batches = {
        kind: [EmbeddingRow.of(processor.prepare_item(sentence, index=i, instructions=instructions),
                               multivector=False, dimensions=None) for i, sentence in enumerate(sentences)]
        for kind, instructions in (("plain", None), ("instructed", instruction))
    }
    dump = lambda value: pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # noqa: E731 - as the pipe does

    def per_row(rows):  # (server process's work, model process's work) with an object per row
        payload = dump(("embed", 0, rows))
        return (lambda: dump(("embed", 0, rows)),
                lambda: model.collate_rows([row.prepared for row in pickle.loads(payload)[2]]))

    def columns(rows):  # the same with the rows as columns, as they travel
        payload = dump(("embed", 0, PackedRows.of(rows, processor)))
        return (lambda: dump(("embed", 0, PackedRows.of(rows, processor))),
                lambda: model.collate_rows([row.prepared for row in pickle.loads(payload)[2].unpack()]))

    cases = {(kind, form): make(rows) for kind, rows in batches.items()
             for form, make in (("an object per row", per_row), ("columns", columns))}
    request: dict[tuple, list[tuple[float, float]]] = {case: [] for case in cases}
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.dim).astype(np.float32) for _ in range(args.rows)]
    replies = {"one array": (0, True, BatchResult(vectors, 0.001, 0.005), None),
               "an array per row": (0, True, (vectors, 0.001, 0.005, None), None)}
    reply: dict[str, list[tuple[float, float]]] = {name: [] for name in replies}
    for _ in range(args.rounds):
        for case, (server_side, model_side) in cases.items():
            request[case].append((cpu_us(server_side, args.repeats), cpu_us(model_side, args.repeats)))
        for name, value in replies.items():
            reply[name].append(round_trip_us(value, args.repeats))
    print(f"{args.rows} rows of ~15-word sentences, pooled vectors of {args.dim} float32; medians of "
          f"{args.rounds} alternating rounds of {args.repeats} calls")
    print("request: us of CPU per batch; server process: pack and pickle; model process: unpickle, unpack, "
          "collate_rows")
    print(f"{'':32} {'server':>9} {'model':>9} {'bytes':>9}")
    medians = {}
    for (kind, form), timings in request.items():
        medians[kind, form] = tuple(statistics.median(t[i] for t in timings) for i in (0, 1))
        rows = batches[kind]
        size = len(dump(("embed", 0, PackedRows.of(rows, processor) if form == "columns" else rows)))
        print(f"{kind + ', ' + form:32} {medians[kind, form][0]:9.1f} {medians[kind, form][1]:9.1f} {size:9d}")
    for kind in batches:
        new, old = medians[kind, "columns"], medians[kind, "an object per row"]
        print(f"{kind}: columns / an object per row: server process {new[0] / old[0]:.2f}x, model process "
              f"{new[1] / old[1]:.2f}x")
    print(f"reply: {'':24} {'dumps us':>9} {'loads us':>9} {'bytes':>9}")
    totals = {}
    for name, value in replies.items():
        dumps = statistics.median(t[0] for t in reply[name])
        loads = statistics.median(t[1] for t in reply[name])
        totals[name] = dumps + loads
        print(f"reply, {name:24} {dumps:9.1f} {loads:9.1f} {len(dump(value)):9d}")
    print(f"reply, one array / an array per row (dumps + loads): "
          f"{totals['one array'] / totals['an array per row']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
