"""Fixtures for `nova train` tests: the synthetic task, one real training run shared by the tests that
inspect its results, a CLI runner and a real `nova serve` on loopback."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from nova.training.synthetic import make_task

TRAIN_STEPS = 300


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """240 training triplets (3 hard negatives each); 60 held-out queries over 180 documents."""
    return make_task(tmp_path_factory.mktemp("task"), seed=0)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def trained(task, tiny_dir, tmp_path_factory):
    """One `nova train` run (the real command, in-process): 300 steps from scratch, held-out eval at the end."""
    from nova.cli import main

    root = tmp_path_factory.mktemp("lora-root")
    out = root / "pairs-adapter"
    adapters_before = tree_digest(Path(tiny_dir) / "adapters")
    started = time.perf_counter()
    code = main(["train", "--data", str(task["train"]), "--out", str(out), "--steps", str(TRAIN_STEPS),
                 "--lr", "2e-3", "--batch-size", "16", "--rank", "16", "--eval-dataset", str(task["eval"]),
                 "--checkpoint-every", "100", "--no-progress", "--log-every", "100"])
    assert code == 0
    return {"out": out, "root": root, "adapters_before": adapters_before, "seconds": time.perf_counter() - started,
            "steps": TRAIN_STEPS}


@pytest.fixture(scope="session")
def nova_server(tiny_dir, trained, serve_process):
    server = serve_process(Path(tiny_dir), trained["root"])
    yield server
    server.stop()
