"""What a user sees from `nova embed` on Ray (a real driver process joining the session's cluster): only Nova's own
lines; Ray's INFO lines, its C++ core's log lines and Ray Data's messages and warnings appear with
`--log-level debug` only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Nova's lines: its messages ("nova embed: ...") and its log records ("<time> INFO nova.embed: ...")
NOVA_LINE = re.compile(r"^(nova embed: |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) nova\.embed: )")


def _embed(corpus: Path, out: Path, address: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for key in ("RAY_BACKEND_LOG_LEVEL", "RAY_DEDUP_LOGS"):  # the defaults a user has
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "nova.cli", "embed", str(corpus), str(out), "--ray-address", address,
                           "--no-progress", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_ray_run_prints_only_novas_lines_unless_debugging(ray_cluster, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"note {i} on rivers"}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    done = _embed(corpus, out, ray_cluster)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not NOVA_LINE.match(line)] == []
    assert done.stdout.startswith("nova embed: 12 rows embedded, 0 in error") and "(Ray)" in done.stdout

    debug = _embed(corpus, out, ray_cluster, "--overwrite", "--log-level", "debug")
    assert debug.returncode == 0, debug.stderr
    assert "Connecting to existing Ray cluster" in debug.stderr  # the "ray" logger
    assert "streaming_executor.py" in debug.stderr  # Ray Data's execution lines
    assert re.search(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] \w+\.cc:\d+", debug.stderr, re.M)  # the C++ core
