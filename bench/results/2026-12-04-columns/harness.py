"""Before/after of one change, each tree's own code: a batch's host work on each side of the pipe, as that tree
does it. Before: the server pickles the rows (an object per row); the model process unpickles and collates them
(`collate_rows`, torch). After: the server packs the rows into columns (`PackedRows`) and pickles them; the model
process unpickles, unpacks and collates (numpy). CPU time of the calling thread, medians of rounds.

    TREE=/tmp/before /work/main/.venv/bin/python harness.py --rows 64   # run from the tree's own root
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
from pathlib import Path

TREE = os.environ.get("TREE", os.getcwd())
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's bench/, for its timer
from bench_pipe import cpu_us  # noqa: E402

sys.path.insert(0, TREE)  # the measured tree's code first (bench_pipe put this checkout's root in front)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import serve.rows as rows_module
    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint
    from serve.rows import EmbeddingRow

    model = load_model(str(ensure_tiny_checkpoint()), trust_remote_code=True)
    processor = model.processor
    packed = getattr(rows_module, "PackedRows", None)
    words = "rivers mountains planets violins engines gardens castles oceans forests deserts harbors".split()
    sentences = [" ".join(words[(i + j) % len(words)] for j in range(15)) for i in range(args.rows)]
    dump = lambda value: pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # noqa: E731
    results = {}
    for kind, instructions in (("plain", None), ("instructed", "Represent the query for retrieving relevant passages")):
        rows = [EmbeddingRow.of(processor.prepare_item(s, index=i, instructions=instructions), multivector=False,
                                dimensions=None) for i, s in enumerate(sentences)]
        if packed is None:
            payload = dump(("embed", 0, rows))
            server = lambda rows=rows: dump(("embed", 0, rows))  # noqa: E731
            model_side = lambda payload=payload: model.collate_rows(  # noqa: E731
                [row.prepared for row in pickle.loads(payload)[2]])
        else:
            payload = dump(("embed", 0, packed.of(rows, processor)))
            server = lambda rows=rows: dump(("embed", 0, packed.of(rows, processor)))  # noqa: E731
            model_side = lambda payload=payload: model.collate_rows(  # noqa: E731
                [row.prepared for row in pickle.loads(payload)[2].unpack()])
        timings = [(cpu_us(server, args.repeats), cpu_us(model_side, args.repeats)) for _ in range(args.rounds)]
        results[kind] = tuple(statistics.median(t[i] for t in timings) for i in (0, 1))
    form = "columns" if packed is not None else "an object per row"
    print(f"{TREE} ({form}), {args.rows} rows: us of CPU per batch, medians of {args.rounds} rounds of {args.repeats}")
    for kind, (server_us, model_us) in results.items():
        print(f"  {kind:10} server process {server_us:7.1f}   model process {model_us:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
