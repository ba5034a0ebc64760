"""The server's helper threads get no OpenMP team of their own (serve/openmp.py): a live thread with a team makes
libgomp cut every worker's spin-wait once the process holds more OpenMP threads than CPUs, and CPU forwards
then run up to twice as long. Counted, not timed: the process's threads while a helper that ran a parallel
torch operation is still alive."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from serve.engine import ThreadEngine
from serve.openmp import helper_pool, single_threaded_openmp

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
    reason="needs /proc and torch running more than one thread",
)

LARGE = 1 << 20  # elements: well above torch's grain size, so the operation runs as a parallel region


def threads_now() -> set[str]:
    """The process's thread ids. Tests count the ids added since a moment, not the change in the number of
    threads: a thread left by an earlier test may end meanwhile."""
    return set(os.listdir("/proc/self/task"))


def parallel_work() -> None:
    torch.ones(LARGE).mul(2).sum()


def threads_with_helper_alive(setup) -> int:
    """Threads added to this process while a helper thread, after `setup()`, has run a parallel torch operation
    and is still alive (OpenMP keeps a thread's team for as long as the thread lives)."""
    parallel_work()  # this thread's own team exists before the count
    ran, finish = threading.Event(), threading.Event()

    def helper():
        setup()
        parallel_work()
        ran.set()
        finish.wait()

    before = threads_now()
    thread = threading.Thread(target=helper)
    thread.start()
    try:
        assert ran.wait(30)
        return len(threads_now() - before)
    finally:
        finish.set()
        thread.join()


def test_a_helper_thread_runs_torch_on_itself_alone():
    assert threads_with_helper_alive(lambda: None) > 1, "the check cannot tell: a plain helper got no team"
    assert threads_with_helper_alive(single_threaded_openmp) == 1  # the helper itself, no workers


def test_a_helper_thread_stays_alone_with_torch_threads_set():
    """`--torch-threads N` sets torch's count for every thread, which torch applies to a thread on its first
    parallel call there: that must not undo the helper's setting."""
    torch.set_num_threads(torch.get_num_threads())
    assert threads_with_helper_alive(single_threaded_openmp) == 1


def test_the_forward_thread_keeps_its_threads():
    threads = torch.get_num_threads()
    threads_with_helper_alive(single_threaded_openmp)
    assert torch.get_num_threads() == threads


def pool_added_threads(pool) -> int:
    parallel_work()
    before = threads_now()
    try:
        pool.submit(parallel_work).result()
        return len(threads_now() - before)
    finally:
        pool.shutdown(wait=True)


def test_helper_pools_run_torch_on_their_own_threads():
    assert pool_added_threads(helper_pool("test-helper", 2)) == 1  # one worker ran: itself, no team


def test_the_thread_engine_collates_and_finishes_without_teams(tiny_model):
    engine = ThreadEngine(tiny_model)
    try:
        for pool in (engine._collate_thread, engine._finish_thread):
            parallel_work()
            before = threads_now()
            pool.submit(parallel_work).result()
            assert len(threads_now() - before) == 1
    finally:
        for pool in (engine._collate_thread, engine._model_thread, engine._finish_thread):
            pool.shutdown(wait=True)
