"""Torch operations per forward: what a GPU pays at small batch sizes, counted on any CPU.

On a GPU a forward of a few short rows is bound by launching operations, not by arithmetic (on an H100 the
3B shape takes about as long at bs=1 as at bs=32: docs/performance.md). Every dispatched
torch operation costs Python, dispatcher and (for non-views) a kernel launch, so their count is the figure
to drive down, and it does not depend on the machine or the width: this builds the full shape's depth (36
text layers) at the tiny width with three random rank-32 adapters and counts the operations of one
`encode()` per case with a `TorchDispatchMode`. The image cases run the tiny shape's vision tower (2 blocks,
one of them windowed): what they show is the count an additional image adds, whatever its size.

    .venv/bin/python bench/bench_ops.py                # 36 layers
    .venv/bin/python bench/bench_ops.py --layers 2     # the tiny checkpoint's depth
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

VIEWS = {"slice", "select", "view", "reshape", "numpy_T", "t", "transpose", "unsqueeze", "squeeze", "expand",
         "permute", "alias", "as_strided", "detach", "unbind", "split", "split_with_sizes", "_unsafe_view"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36, help="text layers (default: %(default)s, the 3B shape's)")
    args = parser.parse_args()
    import torch
    from gpu_check import INSTRUCTION, QUERIES, image, random_model

    from nova.op_count import count_ops

    model = random_model(torch.device("cpu"), "tiny", layers=args.layers)
    queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)]} for i in range(32)]
    adapters = ["retrieval", "text-matching", "code"]
    cases = {
        "bs=1, no adapter": [dict(queries[0], adapter=None)],
        "bs=1": queries[:1],
        "bs=32": queries,
        "three adapters, bs=16": [dict(queries[i], adapter=adapters[i % 3]) for i in range(16)],
        "bs=32, one instruction (cached)": [dict(q, instructions=INSTRUCTION) for q in queries],
        "bs=32, three instructions (cached)": [dict(q, instructions=f"{INSTRUCTION} ({i % 3})")
                                               for i, q in enumerate(queries)],
    }
    photos = [{"image": image(448, 448, seed), "task": "retrieval.passage"} for seed in range(8)]
    cases.update({
        "1 image 448x448": photos[:1],
        "2 images 448x448": photos[:2],
        "8 images 448x448": photos,
        "448x448 + 896x896 (4x the windows)": [photos[0], dict(photos[1], image=image(896, 896, 1))],
    })
    print(f"{args.layers} text layers, tiny width; torch operations dispatched by one encode()")
    print(f"{'case':36s} {'all':>7s} {'non-view':>9s}   most frequent")
    totals = {}
    for label, batch in cases.items():
        model.encode(batch, batch_size=len(batch))  # fills the prefix cache where there is one
        counts = count_ops(lambda batch=batch: model.encode(batch, batch_size=len(batch)))
        kernels = sum(n for name, n in counts.items() if name not in VIEWS)
        top = ", ".join(f"{name} {n}" for name, n in counts.most_common(4))
        totals[label] = sum(counts.values())
        print(f"{label:36s} {totals[label]:7d} {kernels:9d}   {top}")
    extra = (totals["8 images 448x448"] - totals["1 image 448x448"]) / 7
    print(f"an additional 448x448 image: {extra:.1f} operations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
