"""The prepared GPU check and the host-side benchmarks of the GPU work, run end to end on this CPU (their smoke
modes). A GPU session is rare and short, one prepared call, so a script that a change elsewhere broke must
fail here, not there. Timings are printed, never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_gpu_run_script_passes_every_step_in_its_smoke_mode(tmp_path):
    """`bench/gpu_run.sh` as a GPU session calls it, on this CPU: every step of the forward and server plan runs,
    the CUDA-graphs decision reads the check's log, and the summary finds each step's key lines."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), NOVA_HOME=str(tmp_path / "home"), DEVICE="cpu",
               SIZE_CHECK="tiny", SKIP_FULL="1", SKIP_WHEELS="1", ITEMS="64", PY=sys.executable, LIMIT_SCALE="3")
    done = subprocess.run(["bash", "bench/gpu_run.sh"], cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, f"gpu_run.sh exited {done.returncode}:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.rstrip().endswith("all steps passed")
    assert "=== open-loop forward: eager" in done.stdout  # no graphs on a CPU
    summary = done.stdout.split("=== summary\n", 1)[1].splitlines()
    for start in ("  float16: min pooled cosine to float32", "  bfloat16: min pooled cosine to float32",
                  "  here (CPU, tiny shape, cuda graphs)", "--- small-sentences", "in-process encode(): ",
                  "server CPU ms per request beyond", "--- open-loop", "reference: ", "saturation: ",
                  "lone request (1 client, p50)", "closed loop, 32 clients"):
        assert any(line.startswith(start) for line in summary), f"no summary line starts with {start!r}"


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    report_path = tmp_path / "check.json"
    out = run("bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--rounds", "1", "--json", str(report_path))
    assert out.rstrip().endswith("all checks passed")
    report = json.loads(report_path.read_text())
    assert {"parity", "sdpa", "throughput", "shapes", "dtypes"} <= set(report)
    graphs = report["throughput"]["cuda graphs"]
    assert {"text bs=32 + 40-token instruction", "same, prefix cache, prefixes eager"} <= set(graphs)
    assert set(graphs["targets"]) == set(report["throughput"]["eager"]["targets"])
    assert "instructed batches through prefix buckets / eagerly:" in out


def test_the_replay_host_bench_runs_every_case_through_a_bucket():
    out = run("bench/bench_replay_host.py", "--layers", "2", "--rounds", "1", "--calls", "2")
    cases = ["bs=32 ", "three adapters, bs=16 ", "bs=32, one instruction (cached) ",
             "bs=32, three instructions (cached) "]
    assert [case for case in cases if any(line.startswith(case) for line in out.splitlines())] == cases


@pytest.mark.parametrize("loop, before, name, extra", [
    ("encode", "one at a time", "encode()", ()),
    ("nova-embed", "one at a time", "nova embed", ()),
    ("nova-embed-ray", "tokenized by the actor", "tokenized by the load stage", ()),
    ("nova-embed-ray", "tokenized by the actor", "tokenized by the load stage", ("--image-size", "900x600")),
])
def test_the_encode_ahead_bench_compares_both_loops_on_both_forwards(loop, before, name, extra):
    out = run("bench/bench_encode_ahead.py", "--sentences", "64", "--rounds", "1", "--loop", loop, *extra)
    assert ("each with a 900x600 photo" in out.splitlines()[0]) == bool(extra)
    rows = [line.split(":")[0] for line in out.splitlines()
            if f": {before} " in line and f"{name} " in line and "ratio per round" in line]
    assert rows == ["stand-in forward, 5 ms a batch, asynchronous", "the model's forward on cpu"]
    assert any(line.strip().startswith(f"device busy: {before}") and name in line for line in out.splitlines())
