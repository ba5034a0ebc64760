"""One OpenMP team per process: torch work on the server's helper threads runs on the calling thread alone.

libgomp (torch's CPU backend on Linux) gives every thread that starts a parallel region a team of workers of
its own, kept for as long as that thread lives. Once a process holds more OpenMP threads than the machine has
CPUs, libgomp shortens how long every worker spin-waits before it sleeps, and each of a forward's hundreds of
parallel regions then waits for sleeping workers to wake. On the 2-core sandbox, one live helper thread that
had once run a large enough torch operation made one-sentence CPU forwards take up to twice as long
(bench/results/2026-12-03-openmp-teams). The server's helper threads (receiving and collating batches,
sending replies, adapter calls, request preparation) call `single_threaded_openmp()` first, so that only the
thread that runs forwards has a team. Their own torch work is small, per batch or per request.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (GNU, Intel or LLVM), found among this process's mapped libraries, the
    copy in torch's own folders first (another library may have loaded a second copy); None where there is none
    or no /proc to read it from (then there is nothing to keep apart)."""
    import torch

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    runtimes = sorted((path for path in paths if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp"))),
                      key=lambda path: (not path.startswith((torch_dir + os.sep, torch_dir + ".libs")), path))
    for path in runtimes:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def single_threaded_openmp() -> bool:
    """Make this thread's parallel regions run on this thread alone (`omp_set_num_threads(1)`, a per-thread
    setting; `torch.set_num_threads` would change the forwards' thread too). Returns whether a runtime was
    found. Call it on a helper thread before its first torch operation, or at any point after."""
    import torch

    runtime = _runtime()
    if runtime is None:
        return False
    # torch sets a thread's OpenMP thread count on its first parallel call there: let that happen first,
    # or it would undo this setting
    torch.get_num_threads()
    runtime.omp_set_num_threads(1)
    return True


def helper_pool(name: str, workers: int = 1) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool for a helper's work (collating, replying, preparing requests): its threads run torch on
    themselves alone."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=single_threaded_openmp)


def run_single_threaded(function, *args, **kwargs):
    """`function(*args, **kwargs)` after `single_threaded_openmp()`: for work handed to a shared pool's thread
    (asyncio.to_thread), whose thread outlives the call."""
    single_threaded_openmp()
    return function(*args, **kwargs)
