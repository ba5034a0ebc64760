"""The batch cost model (pure logic): splits heterogeneous candidate batches only when the measured fixed
cost per forward is small against the padding it saves."""

from __future__ import annotations

from types import SimpleNamespace

from serve.cost_model import BatchCostModel
from serve.rows import EmbeddingRow


def _rows(lengths):
    return [EmbeddingRow(SimpleNamespace(index=i, adapter=None), multivector=False, dimensions=None, tokens=n)
            for i, n in enumerate(lengths)]


def test_no_split_until_the_fit_has_data():
    model = BatchCostModel()
    rows = _rows([10, 200, 15, 190])
    assert model.split(rows, rows[0]) is rows
    for _ in range(10):
        model.observe(1000, 1.0)  # no spread in sizes: a and b cannot be separated
    assert model.a is None and model.split(rows, rows[0]) is rows


def test_cheap_forwards_split_by_length_and_keep_the_oldest_row():
    model = BatchCostModel()
    for padded in (100, 400, 1600, 3200, 800, 200, 6400, 50):
        model.observe(padded, 0.001 + padded * 1e-4)  # small fixed cost: padding dominates
    rows = _rows([10, 200, 15, 195, 12])
    group = model.split(rows, rows[0])
    assert rows[0] in group and sorted(r.tokens for r in group) == [10, 12, 15]
    group = model.split(rows, rows[1])
    assert sorted(r.tokens for r in group) == [195, 200]


def test_expensive_forwards_keep_the_batch_whole():
    model = BatchCostModel()
    for padded in (100, 400, 1600, 3200, 800, 200, 6400, 50):
        model.observe(padded, 5.0 + padded * 1e-6)  # large fixed cost (a GPU): never split
    rows = _rows([10, 200, 15, 190, 12])
    assert sorted(r.tokens for r in model.split(rows, rows[2])) == [10, 12, 15, 190, 200]


def test_a_fit_without_fixed_cost_keeps_equal_rows_together():
    """A fit whose intercept comes out negative is clamped to a fixed cost of exactly 0; splitting rows of
    equal length then costs exactly what keeping them together does, and the tie keeps the batch whole
    (broken the other way, it would run single-row batches)."""
    model = BatchCostModel()
    for padded in (100, 400, 1600, 3200, 800, 200, 6400, 50):
        model.observe(padded, padded * 1e-4 - 1e-3)
    assert model.a == 0.0
    model.b = 2**-10  # exact in binary, so that sums of groups tie exactly
    rows = _rows([16] * 8)
    assert len(model.split(rows, rows[3])) == len(rows)


def test_the_first_forward_of_a_shape_is_not_learned_from():
    """A GPU-like forward: a large fixed cost, almost nothing per token, and a first forward of each new shape
    that pays one-time costs growing with its size (allocator growth, kernel selection). Learning from those
    first forwards reads them as per-token cost and splits batches that should stay whole."""
    model = BatchCostModel()
    for rows, longest in ((1, 20), (4, 30), (8, 25), (16, 40), (32, 35), (2, 50), (24, 20), (12, 60)):
        padded = rows * longest
        warm = 0.010 + 1e-7 * padded
        model.observe(padded, warm + 5e-5 * padded, shape=(rows, longest))  # first forward of this shape
        model.observe(padded, warm, shape=(rows, longest))
    assert model.a is not None and abs(model.a - 0.010) < 1e-4
    rows = _rows([10, 200, 15, 195, 12])
    assert len(model.split(rows, rows[0])) == len(rows)


def test_a_window_without_per_token_cost_drops_the_old_fit():
    """A fit that once split batches is not kept when newer forwards show no per-token cost."""
    model = BatchCostModel(window=16)
    for padded in (100, 400, 1600, 3200, 800, 200, 6400, 50):
        model.observe(padded, 0.001 + padded * 1e-4)
    rows = _rows([10, 200, 15, 195, 12])
    assert len(model.split(rows, rows[0])) < len(rows)
    for padded in (100, 400, 1600, 3200, 800, 200, 6400, 50) * 2:
        model.observe(padded, 0.012 - padded * 1e-8)  # flat (slightly falling) with size: no per-token cost
    assert model.b is None and len(model.split(rows, rows[0])) == len(rows)


def _batcher(max_wait_ms=0.0):
    import asyncio

    from serve.batcher import Batcher
    from serve.dispatcher import Dispatcher
    from serve.metrics import Metrics

    async def make():
        batcher = Batcher(Dispatcher(), max_batch_tokens=10_000, max_batch_size=64, max_wait_ms=max_wait_ms,
                          max_queue_tokens=100_000, metrics=Metrics())
        batcher.submit([EmbeddingRow(SimpleNamespace(index=0, adapter=None), multivector=False, dimensions=None,
                                     tokens=12)])
        return batcher

    return asyncio.run(make())


def test_an_idle_model_takes_a_lone_row_at_once_and_a_busy_one_paces_on_its_prediction():
    """Pacing (pure logic, no clock asserted): no fixed wait when the dispatcher is idle; `--max-wait-ms` only
    bounds a wait for company; while one batch runs, the next is due one collation lead before its predicted
    end; with a batch already waiting, nothing is taken until the model frees a slot."""
    import math
    import time

    batcher = _batcher()
    oldest = batcher._pending[0]
    assert batcher.dispatcher.idle() and batcher._take_at() <= time.monotonic()
    waiting = _batcher(max_wait_ms=200)
    assert waiting._take_at() == waiting._pending[0].enqueued + 0.2
    dispatcher = batcher.dispatcher
    dispatcher._prepare_seconds = 0.01
    dispatcher._in_flight, dispatcher._busy_until = 1, time.monotonic() + 0.5  # one batch in, predicted to take 0.5 s
    assert batcher._take_at() == dispatcher._busy_until - 0.011
    assert batcher._take_at() > oldest.enqueued
    dispatcher._in_flight = 2
    assert math.isinf(batcher._take_at())


def test_where_launches_run_ahead_of_a_device_the_next_batch_is_taken_earlier_by_the_launch_time():
    """On a GPU a forward's launch is host work that must end before the running forward does: the engine
    reports it (`launch_seconds`, 0 on a CPU, whose launch is the forward) and the lead grows by it."""
    import asyncio
    import time

    import numpy as np

    from serve.rows import BatchResult

    batcher = _batcher()
    dispatcher = batcher.dispatcher
    dispatcher.on_batch_done = lambda batch, outcomes, result, elapsed: None

    class Engine:
        launch_seconds = 0.0

        async def embed(self, rows):
            return BatchResult([np.zeros(4, np.float32)] * len(rows), 0.01, 0.2, launch_seconds=self.launch_seconds)

    dispatcher.engine = Engine()

    async def one_batch():
        await dispatcher._process([SimpleNamespace(row=SimpleNamespace(position=0))])

    asyncio.run(one_batch())  # a CPU's forward: the lead is the collation's
    dispatcher._in_flight, dispatcher._busy_until = 1, time.monotonic() + 0.5
    assert abs(batcher._take_at() - (dispatcher._busy_until - 0.011)) < 1e-9
    dispatcher.engine.launch_seconds = 0.04
    dispatcher._in_flight = 0
    asyncio.run(one_batch())  # a launch that returned while the device still ran the forward
    dispatcher._in_flight, dispatcher._busy_until = 1, time.monotonic() + 0.5
    assert abs(batcher._take_at() - (dispatcher._busy_until - 0.051)) < 1e-9
    assert b"nova_batcher_host_lead_seconds 0.051" in batcher.metrics.render()  # what operators see of it


def test_the_lead_is_the_whole_hand_off_when_the_engine_says_when_a_batch_was_ready():
    """A model process reports when each batch was collated (`ready_at`, the machine's monotonic clock): the lead
    is then the hand-off's whole time (packing, the pipe, unpacking, collation), not the collation's alone, which
    leaves the rest out and lets the model wait."""
    import asyncio
    import time

    import numpy as np

    from serve.rows import BatchResult

    batcher = _batcher()
    dispatcher = batcher.dispatcher
    dispatcher.on_batch_done = lambda batch, outcomes, result, elapsed: None
    called = []

    class Engine:
        async def embed(self, rows):
            called.append(time.monotonic())  # ready 50 ms after this; collation alone took 10
            return BatchResult([np.zeros(4, np.float32)] * len(rows), 0.01, 0.2, ready_at=called[-1] + 0.05)

    dispatcher.engine = Engine()
    before = time.monotonic()
    asyncio.run(dispatcher._process([SimpleNamespace(row=SimpleNamespace(position=0))]))
    assert 0.05 + 0.001 <= dispatcher.host_lead() <= called[0] - before + 0.05 + 0.001


def test_a_busy_model_takes_the_next_batch_earlier_by_how_late_the_batcher_wakes():
    """The event loop ran the batcher's timers late: the next batch is taken earlier by the smoothed lateness,
    never earlier than half of a batch's time before the collation lead."""
    import time

    batcher = _batcher()
    dispatcher = batcher.dispatcher
    dispatcher._prepare_seconds = 0.01
    dispatcher._in_flight, dispatcher._busy_until = 1, time.monotonic() + 0.5
    batcher._batch_seconds = 0.5
    on_time = batcher._take_at()
    for _ in range(60):
        batcher.lateness.observe(0.02)
    assert abs(batcher.lateness.allowance() - 0.02) < 0.001
    assert abs((on_time - batcher._take_at()) - batcher.lateness.allowance()) < 1e-9
    for _ in range(20):
        batcher.lateness.observe(2.0)  # a stalled loop: capped at half a batch
    assert abs((on_time - batcher._take_at()) - 0.25) < 1e-9
    for _ in range(60):
        batcher.lateness.observe(-0.001)  # on time again (an early wake-up counts as none): back to the lead
    assert on_time - batcher._take_at() < 0.001
