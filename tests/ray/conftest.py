"""ONE local Ray cluster (2 CPUs) for the whole test session: starting one takes 30-70 s on a small machine.

Every test here is marked `ray` (select them with `-m ray`, skip them with `-m "not ray"`); they run in the
default suite. Processes are found and killed through /proc, the way an operator would kill a worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster(tiny_dir):
    """The session's local Ray (address for subprocess drivers); shut down at the end."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="nova-tests")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def ray_worker_pids(fragment: str) -> list[int]:
    """Pids of this machine's Ray worker processes whose title names `fragment` (e.g. 'ModelStage')."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and fragment in cmdline:
            pids.append(int(entry))
    return pids


def kill_one(fragment: str, timeout: float = 300) -> int:
    """SIGKILL one Ray worker whose title names `fragment`, waiting for one to exist; -> its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = ray_worker_pids(fragment)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.02)
    raise AssertionError(f"no Ray worker named {fragment!r} appeared")


@pytest.fixture
def kill_ray_worker():
    return kill_one
