"""A lone encode() while another live thread has (or has not) run a parallel torch operation, in one process.

    .venv/bin/python bench/results/2026-12-03-openmp-teams/live_helper_repro.py [--fixed]

--fixed: the helper calls serve.openmp.single_threaded_openmp() first.
"""

import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [os.path.join(ROOT, "bench"), ROOT]

import torch  # noqa: E402
from bench_server import make_sentences  # noqa: E402

from nova.loading import load_model  # noqa: E402
from nova.tiny import ensure_tiny_checkpoint  # noqa: E402
from serve.openmp import single_threaded_openmp  # noqa: E402

model = load_model(str(ensure_tiny_checkpoint(size="small")))
sentences = make_sentences(50, seed=1)
big = torch.randn(64, 2048)


def lone(label: str) -> None:
    model.encode([sentences[0]], show_progress=False)
    started = time.perf_counter()
    for sentence in sentences:
        model.encode([sentence], show_progress=False)
    print(f"{label}: {(time.perf_counter() - started) * 1000 / len(sentences):.1f} ms per lone encode(); "
          f"threads in this process: {len(os.listdir('/proc/self/task'))}", flush=True)


def helper(stop: threading.Event) -> None:
    if "--fixed" in sys.argv:
        single_threaded_openmp()
    (big * 2).sum()  # 131k elements: a parallel region, on this thread's own team unless fixed
    stop.wait()


lone("no helper")
lone("no helper")
stop = threading.Event()
thread = threading.Thread(target=helper, args=(stop,))
thread.start()
time.sleep(0.2)
lone("a live helper that ran a parallel region")
lone("again")
stop.set()
thread.join()
lone("the helper ended")
