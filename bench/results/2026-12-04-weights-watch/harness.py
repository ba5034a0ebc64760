"""Host cost of the prefix cache's staleness checks, and of an instructed encode(), with this tree's own code.
Run from a tree's root: TREE=<name> /work/main/.venv/bin/python <this file> [--layers 36]

The model is the 3B shape's depth at the tiny width (bench/gpu_check.py's random_model, three rank-32
adapters), so that the forward is small and the host work shows."""

import argparse
import os
import statistics
import sys
import time

ROOT = os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
from gpu_check import INSTRUCTION, QUERIES, random_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=36)
parser.add_argument("--rounds", type=int, default=7)
args = parser.parse_args()
torch.set_num_threads(1)
model = random_model(torch.device("cpu"), "tiny", layers=args.layers)
if hasattr(model, "backbone_watch"):
    def check():
        return model.backbone_watch.state(model.model), model.adapters_watch.state(model.lora)
else:
    def check():
        return model._weights_identity(), model.lora.weights_identity()
queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)], "instructions": INSTRUCTION}
           for i in range(32)]


def cpu_us(fn, calls):
    fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


checks = [cpu_us(check, 200) for _ in range(args.rounds)]
encodes = [cpu_us(lambda: model.encode(queries, batch_size=32), 20) for _ in range(args.rounds)]
print(f"{os.environ.get('TREE', '?')}: {args.layers} layers; staleness checks {statistics.median(checks):.0f} us per "
      f"batch; encode() of 32 instructed queries {statistics.median(encodes):.0f} us of CPU (medians of "
      f"{args.rounds})")
