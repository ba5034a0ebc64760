"""Several processes, one logical batch: really launched with torchrun (gloo on the CPU, 2 processes).

- one contrastive batch split across 2 processes (uneven shards: 3 and 4 triplets, hard negatives of 0 to 3
  per triplet, a duplicate positive, GradCache mini-batches, pooled and multi-vector losses, a false-negative
  margin) gives the loss, the LoRA gradients and the negatives per query of 1 process holding the whole batch;
- `torchrun --nproc-per-node 2 -m nova train` and `nova train` train the same adapter (20 steps, same seed),
  and a checkpoint of the 2-process run resumes in 1 process to that same adapter;
- so do two `torchrun --nnodes 2` launches on this machine, one process each, joined by static rendezvous
  on loopback as two machines would be (the multi-node command of docs/training-and-evaluation.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCH_TIMEOUT_S = 600  # a launch that hangs (a collective or a rendezvous waiting forever) fails the test
RENDEZVOUS_TIMEOUT_S = 60  # how long a node waits for the others to join before giving up
# the same 20-step run, however many processes run it
TRAINING = ["--steps", "20", "--batch-size", "8", "--mini-batch-size", "3", "--rank", "4", "--lr", "5e-3", "--seed", "3",
            "--no-progress", "--log-every", "10"]


def loopback_environment() -> dict[str, str]:
    """gloo on the loopback interface, whatever this machine's hostname resolves to: nothing leaves it."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return dict(os.environ, **({"GLOO_SOCKET_IFNAME": names[0]} if names else {}))


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "--standalone", f"--nproc-per-node={processes}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=loopback_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun_nodes(*args: str, port: int, logs: Path, nodes: int = 2) -> list[str]:
    """`torchrun` once per node, all on this machine, one process each, joined as separate machines are: static
    rendezvous at node 0's address (127.0.0.1) and `port`. Each node's output (stdout and stderr) goes to
    `logs/node-R.log` (files, not pipes: a node blocked on a full pipe would stall the others' collectives);
    returns them. Once a node fails, or LAUNCH_TIMEOUT_S have passed, the launches still running are killed
    with their workers (a node left alone would wait for the others until its own timeouts)."""
    launches = []
    for rank in range(nodes):
        command = [*TORCHRUN, f"--nnodes={nodes}", f"--node-rank={rank}", "--nproc-per-node=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-conf", f"timeout={RENDEZVOUS_TIMEOUT_S}",
                   *args]
        with (logs / f"node-{rank}.log").open("w") as log:
            launches.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                             env=loopback_environment(), start_new_session=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    killed = [False] * nodes
    try:
        while time.monotonic() < deadline and not any(launch.poll() for launch in launches) \
                and any(launch.poll() is None for launch in launches):
            time.sleep(0.2)
    finally:
        for rank, launch in enumerate(launches):
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)  # its own session: the launcher and its workers
                launch.wait()
                killed[rank] = True
    outputs = [(logs / f"node-{rank}.log").read_text() for rank in range(nodes)]
    failed = [rank for rank, launch in enumerate(launches) if launch.returncode and not killed[rank]]
    assert not failed, "\n".join(f"node {rank} exited with {launches[rank].returncode}:\n{outputs[rank][-3000:]}"
                                  for rank in failed)
    assert not any(killed), f"killed after {LAUNCH_TIMEOUT_S} s:\n" + "\n".join(
        f"node {rank}:\n{outputs[rank][-1500:]}" for rank in range(nodes) if killed[rank])
    return outputs


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
    # 23 candidates, one of them row 2's duplicate: 22 - 1/7 per query before the margin drops any
    assert two["negatives_per_query"] == pytest.approx(one["negatives_per_query"], abs=1e-6)
    assert one["negatives_per_query"] < 22 - 1 / 7
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


def assert_trains_like(tiny_dir, reference: Path, runs: dict[str, Path]) -> None:
    """Each run's adapter gives the reference's vectors (cosine >= 0.9999), and the reference's differ from the
    base model's: agreeing adapters that had not trained would prove nothing."""
    vectors = probe_vectors(tiny_dir, {"reference": reference, **runs})
    for name in runs:
        cosine = F.cosine_similarity(vectors[name], vectors["reference"], dim=-1)
        assert float(cosine.min()) >= 0.9999, (name, cosine)
    assert float(F.cosine_similarity(vectors["reference"], vectors["base"], dim=-1).min()) < 0.999  # it did train


@pytest.fixture(scope="module")
def small_data(task, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("\n".join(Path(task["train"]).read_text().splitlines()[:48]) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process_adapter(small_data, tmp_path_factory) -> Path:
    """The reference: `nova train` (in this process) on the small data, TRAINING's settings."""
    from nova.cli import main

    out = tmp_path_factory.mktemp("one-process") / "one"
    assert main(["train", "--data", str(small_data), "--out", str(out), *TRAINING]) == 0
    return out


def test_two_and_one_process_runs_train_the_same_adapter(small_data, one_process_adapter, tiny_dir, tmp_path,
                                                         run_cli):
    common = ["--data", str(small_data), *TRAINING]
    two = tmp_path / "two"
    done = torchrun("-m", "nova", "train", "--out", str(two), "--checkpoint-every", "10", *common)
    assert "2 processes (gloo)" in done.stdout and done.stdout.count("adapter written to") == 1
    records = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))  # one writer
    # the 2-process run's step-10 checkpoint, resumed by one process
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoints" / "step-0000010", resumed / "checkpoints" / "step-0000010")
    code, out, err = run_cli("train", "--out", resumed, "--resume", *common)
    assert code == 0 and "at step 10/20" in out, err

    assert_trains_like(tiny_dir, one_process_adapter, {"two": two, "resumed": resumed})
    a = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == load_file(str(one_process_adapter / "adapter_model.safetensors")).keys()


def test_two_nodes_joined_by_rendezvous_train_the_same_adapter(small_data, one_process_adapter, tiny_dir, tmp_path,
                                                               loopback_port):
    out = tmp_path / "two-nodes"
    outputs = torchrun_nodes("-m", "nova", "train", "--data", str(small_data), "--out", str(out), *TRAINING,
                             port=loopback_port, logs=tmp_path)
    assert "2 processes (gloo)" in outputs[0]
    assert ["adapter written to" in output for output in outputs] == [True, False]  # node 0 holds rank 0
    assert_trains_like(tiny_dir, one_process_adapter, {"two nodes": out})
