"""Host cost of preparing one item (`processor.prepare_item`: routing, the chat template, tokenizing): what a
server spends per sentence before any forward, on the thread that also parses and renders requests.

On a GPU the forward of a batch of short sentences costs a few milliseconds for the whole batch, so the host's
per-item work sets how many requests one server process can feed it. This times `prepare_item` on ~15-word
sentences (plain, with a task prompt, with instructions) with the processor as it is, and with nothing kept
between items (the chat template rendered and its markup tokenized, the instructions' turn tokenized, for
every item), in alternating rounds of one run, and prints microseconds per item and their ratio.

    .venv/bin/python bench/bench_prepare.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


class _Forgetful(dict):
    """A store that keeps nothing: every item renders and tokenizes the template and its instructions again."""

    def __setitem__(self, key, value) -> None:
        pass


def per_item_us(processor, items: list[tuple[dict, str | None]]) -> float:
    started = time.perf_counter()
    for item, instructions in items:
        processor.prepare_item(item, index=0, instructions=instructions)
    return (time.perf_counter() - started) / len(items) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="items per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    args = parser.parse_args()
    from bench_server import make_sentences
    from transformers import AutoProcessor

    from nova.tiny import ensure_tiny_checkpoint

    processor = AutoProcessor.from_pretrained(str(ensure_tiny_checkpoint()), trust_remote_code=True)
    sentences = make_sentences(args.items, seed=0)
    cases = {
        "query (task prompt)": [({"text": s}, None) for s in sentences],
        "passage": [({"text": s, "task": "retrieval.passage"}, None) for s in sentences],
        "query + instructions": [({"text": s}, "Retrieve passages that answer the question") for s in sentences],
    }
    print(f"{args.items} items per round, {args.rounds} rounds; microseconds per item (median over rounds)")
    print(f"{'case':<24} {'kept':>8} {'not kept':>10} {'ratio':>7}")
    kept_stores = processor._layouts, processor._instruction_ids
    for name, items in cases.items():
        kept, forgot = [], []
        for _ in range(args.rounds):
            processor._layouts, processor._instruction_ids = kept_stores
            kept.append(per_item_us(processor, items))
            processor._layouts, processor._instruction_ids = _Forgetful(), _Forgetful()
            forgot.append(per_item_us(processor, items))
        processor._layouts, processor._instruction_ids = kept_stores
        a, b = statistics.median(kept), statistics.median(forgot)
        print(f"{name:<24} {a:>8.1f} {b:>10.1f} {a / b:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
