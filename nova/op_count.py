"""Torch operations dispatched by a call, counted by name: on a GPU each is a launch (or a view), so at small
batch sizes their number, not arithmetic, sets the time. Counts do not depend on the machine, so a CPU can
check them (bench/bench_ops.py; tests/test_prefix_cache.py)."""

from __future__ import annotations

import collections


def count_ops(fn) -> collections.Counter:
    """{operation name: calls} of everything `fn()` dispatches to torch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return counts
