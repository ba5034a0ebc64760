"""`nova embed` on a real local Ray (the session's cluster): equal to in-process encode(), every row exactly
once when a model actor is killed mid-run, resume after the driver is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# one row per forward pass, so that the run lasts long enough to be interrupted (21 parts of 50 rows)
ARGS = ("--workers", "2", "--shard-rows", "50", "--max-batch-size", "1", "--no-progress")
PARTS = 21


def _wait_for_parts(out: Path, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < n:
        assert time.monotonic() < deadline, f"fewer than {n} parts in {out}"
        time.sleep(0.1)


def test_two_actors_equal_encode_with_one_actor_killed_mid_batch(ray_cluster, run_cli, embed_corpus,
                                                                 embed_reference, check_embed_output, tmp_path,
                                                                 kill_ray_worker):
    path, _, bad = embed_corpus
    out = tmp_path / "out"
    killed: list[int] = []
    parts_at_kill: list[int] = []

    def kill_while_embedding():
        # Ray titles an actor process after the method it runs: ".submit" = a batch of rows is in the model
        killed.append(kill_ray_worker("MapWorker(MapBatches(ModelStage)).submit"))
        parts_at_kill.append(len(list(out.glob("part-*.parquet"))))

    killer = threading.Thread(target=kill_while_embedding, daemon=True)
    killer.start()
    code, stdout, stderr = run_cli("embed", path, out, *ARGS)
    killer.join(timeout=5)
    assert code == 0, stderr
    assert killed and parts_at_kill[0] < PARTS, "no model actor was killed mid-run"
    assert len(list(out.glob("part-*.parquet"))) == PARTS
    check_embed_output(out, embed_reference, bad)
    assert "1000 rows embedded, 5 in error" in stdout and "(Ray)" in stdout


def test_driver_killed_then_resumed_gives_the_same_output(ray_cluster, run_cli, embed_corpus, embed_reference,
                                                          check_embed_output, tmp_path):
    path, _, bad = embed_corpus
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    driver = subprocess.Popen([sys.executable, "-m", "nova.cli", "embed", str(path), str(out), *ARGS,
                               "--ray-address", ray_cluster], cwd=str(REPO), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_parts(out, 1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert done < PARTS, "the run finished before it could be interrupted"
    code, stdout, stderr = run_cli("embed", path, out, *ARGS, "--resume")
    assert code == 0, stderr
    assert f"resuming: {done} of {PARTS}" in stderr
    check_embed_output(out, embed_reference, bad)
