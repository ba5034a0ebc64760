"""What a run reports while it runs (progress line, OUT/train_log.jsonl, memory) and bf16 training on the CPU:
autocast with bfloat16 weights, the LoRA parameters kept (and saved) in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture
def duplicate_data(tmp_path):
    """4 triplets, 4 hard negatives, one of them the same passage as row 0's positive: 8 candidates, so each
    query has 7 negatives except row 0 with 6 (its duplicate is masked): 6.75 per query."""
    rows = [
        {"query": "river stone", "positive": "ocean wolf", "negatives": ["apple pie", "silver cloud"]},
        {"query": "garden window", "positive": "paper candle"},
        {"query": "forest bridge", "positive": "mirror pencil", "negatives": ["ocean wolf"]},
        {"query": "music rabbit", "positive": "basket castle", "negatives": ["dragon engine"]},
    ]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_progress_log_memory_and_bf16(run_cli, duplicate_data, tmp_path):
    out = tmp_path / "bf16"
    code, stdout, stderr = run_cli("train", "--data", duplicate_data, "--out", out, "--steps", "2", "--batch-size", "4",
                                   "--mini-batch-size", "3", "--precision", "bf16", "--rank", "4", "--no-progress",
                                   "--log-every", "1")
    assert code == 0, stderr
    assert "memory per process: weights" in stdout and "(bfloat16)" in stdout
    assert "memory after the first step:" in stdout and "getrusage" in stdout
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("triplets/s" in line and "tokens/s" in line for line in lines)
    assert lines[0].startswith("step 1/2 loss ") and "7 negatives/query" in lines[0]  # 6.75, rounded
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["negatives_per_query"] == pytest.approx(6.75)
    assert all(r["triplets_per_s"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert [r["lr"] for r in records] == pytest.approx([1e-4, 0.0])  # linear decay over 2 steps from 2e-4
    assert records[1]["loss"] > 0 and records[1]["total_steps"] == 2
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # fp32 masters, whatever the weights' dtype
    summary = json.loads((out / "nova_training.json").read_text())
    assert summary["config"]["precision"] == "bf16" and summary["peak_memory_bytes"] > 0
    assert summary["reload_max_abs_diff"] < 3e-2
