"""bench/bench_train.py's own measurements: the CPU tensor peak it reports as memory, and the lengthened passages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tensor_peak_is_the_most_held_at_once_not_the_sum():
    mib = 2**20

    def run():
        first = torch.ones(8 * mib, dtype=torch.uint8)
        second = torch.ones(4 * mib, dtype=torch.uint8)  # both held: 12 MiB at once
        del first, second
        third = torch.ones(6 * mib, dtype=torch.uint8)  # after both were freed: never more than 12 MiB
        del third

    peak = _bench().cpu_tensor_peak_bytes(run)
    assert 12 * mib <= peak < 13 * mib


def test_lengthened_passages_have_the_asked_words_and_keep_their_own(tmp_path):
    path = tmp_path / "train.jsonl"
    records = [{"query": "a b", "positive": "river stone", "negatives": ["cloud music", "paper"]},
               {"query": "c", "positive": " ".join(["apple"] * 12), "negatives": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _bench().lengthen_passages(path, 10)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["query"] for r in got] == ["a b", "c"]
    assert [len(p.split()) for p in (got[0]["positive"], *got[0]["negatives"])] == [10, 10, 10]
    assert got[0]["positive"].split()[:2] == ["river", "stone"] and got[0]["negatives"][1].split()[0] == "paper"
    assert got[1]["positive"] == records[1]["positive"]  # already longer: unchanged
