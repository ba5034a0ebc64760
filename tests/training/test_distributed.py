"""Several processes, one logical batch: really launched with torchrun (gloo on the CPU, 2 processes).

- one contrastive batch split across 2 processes (uneven shards: 3 and 4 triplets, hard negatives of 0 to 3
  per triplet, a duplicate positive, GradCache mini-batches, pooled and multi-vector losses) gives the loss and
  the LoRA gradients of 1 process holding the whole batch;
- `torchrun --nproc-per-node 2 -m nova train` and `nova train` train the same adapter (20 steps, same seed),
  and a checkpoint of the 2-process run resumes in 1 process to that same adapter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def uneven_data(task, tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in Path(task["train"]).read_text().splitlines()[:7]]
    rows[1]["negatives"] = []
    rows[4]["negatives"] = rows[4]["negatives"][:1]
    rows[5]["negatives"][0] = rows[2]["positive"]  # the same passage as another row's positive: masked
    path = tmp_path_factory.mktemp("uneven") / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[name].reshape(-1) for name in sorted(grads)])


def test_two_processes_give_the_loss_and_gradients_of_one(uneven_data, tiny_dir, tmp_path):
    script = str(HERE / "distributed_gradients.py")
    alone = subprocess.run([sys.executable, script, str(uneven_data), str(tmp_path / "o1"), str(tmp_path / "one.pt")],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    torchrun(script, str(uneven_data), str(tmp_path / "o2"), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    want, got = flat(one["grads"]), flat(two["grads"])
    assert float(want.norm()) > 0 and one["grads"].keys() == two["grads"].keys()
    assert float((got - want).norm() / want.norm()) <= 1e-5


def probe_vectors(tiny_dir, adapters: dict[str, Path]) -> dict[str, torch.Tensor]:
    from nova.loading import load_model

    model = load_model(tiny_dir)
    items = [{"task": "retrieval.query", "text": "river stone"}, {"task": "retrieval.passage", "text": "ocean wolf"},
             {"task": "retrieval.query", "text": "apple garden window"}]
    vectors = {}
    for name, folder in adapters.items():
        model.load_adapter(name, str(folder))
        vectors[name] = torch.stack(model.encode([dict(i, adapter=name) for i in items]))
    vectors["base"] = torch.stack(model.encode([dict(i, adapter="none") for i in items]))
    return vectors


def test_two_and_one_process_runs_train_the_same_adapter(task, tiny_dir, tmp_path, run_cli):
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(Path(task["train"]).read_text().splitlines()[:48]) + "\n")
    common = ["--data", str(data), "--steps", "20", "--batch-size", "8", "--mini-batch-size", "3", "--rank", "4",
              "--lr", "5e-3", "--seed", "3", "--no-progress", "--log-every", "10"]
    two = tmp_path / "two"
    done = torchrun("-m", "nova", "train", "--out", str(two), "--checkpoint-every", "10", *common)
    assert "2 processes (gloo)" in done.stdout and done.stdout.count("adapter written to") == 1
    records = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))  # one writer
    one = tmp_path / "one"
    code, _, err = run_cli("train", "--out", one, *common)
    assert code == 0, err
    # the 2-process run's step-10 checkpoint, resumed by one process
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoints" / "step-0000010", resumed / "checkpoints" / "step-0000010")
    code, out, err = run_cli("train", "--out", resumed, "--resume", *common)
    assert code == 0 and "at step 10/20" in out, err

    vectors = probe_vectors(tiny_dir, {"two": two, "one": one, "resumed": resumed})
    for name in ("two", "resumed"):
        cosine = F.cosine_similarity(vectors[name], vectors["one"], dim=-1)
        assert float(cosine.min()) >= 0.9999, (name, cosine)
    assert float(F.cosine_similarity(vectors["one"], vectors["base"], dim=-1).min()) < 0.999  # it did train
    a, b = load_file(str(two / "adapter_model.safetensors")), load_file(str(one / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
