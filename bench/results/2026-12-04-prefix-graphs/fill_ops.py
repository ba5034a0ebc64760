"""Operations a prefix bucket dispatches outside its graph per batch: `StaticForward.fill` (the host-to-device
copies of the batch, the zeroing of the prefix buffer, one copy per distinct prefix). Run from the repository
root: .venv/bin/python bench/results/2026-12-04-prefix-graphs/fill_ops.py [--layers N]"""

import argparse
import collections
import os
import sys

ROOT = os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
from bench_ops import VIEWS  # noqa: E402
from gpu_check import INSTRUCTION, QUERIES, random_model  # noqa: E402

from nova.op_count import count_ops  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=36)
args = parser.parse_args()
model = random_model(torch.device("cpu"), "tiny", layers=args.layers)
model.configure_cuda_graphs(True, capture=False)  # the bucket path on its static buffers, no capture on a CPU
queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)]} for i in range(32)]
cases = {
    "bs=32, no instruction": queries,
    "bs=32, one instruction (cached)": [dict(q, instructions=INSTRUCTION) for q in queries],
    "bs=32, three instructions (cached)": [dict(q, instructions=f"{INSTRUCTION} ({i % 3})") for i, q in enumerate(queries)],
}
print(f"{args.layers} text layers; torch operations of StaticForward.fill per batch (outside the graph)")
for label, batch in cases.items():
    model.cuda_graphs.configure(True, capture=False)  # drops the buckets so far
    model.encode(batch, batch_size=len(batch))  # the prefix cache filled, this batch's one bucket built
    (forward,) = model.cuda_graphs._forwards.values()
    fill, counted = forward.fill, collections.Counter()

    def counting_fill(*a, fill=fill, counted=counted, **k):
        counted.update(count_ops(lambda: fill(*a, **k)))

    forward.fill = counting_fill
    model.encode(batch, batch_size=len(batch))
    forward.fill = fill
    kernels = sum(n for name, n in counted.items() if name not in VIEWS)
    print(f"{label:36s} all {sum(counted.values()):3d}  non-view {kernels:3d}   {dict(counted.most_common(6))}")
