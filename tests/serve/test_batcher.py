"""The batch cost model (pure logic): splits heterogeneous candidate batches only when the measured fixed
cost per forward is small against the padding it saves."""

from __future__ import annotations

from serve.batcher import BatchCostModel, Row


def _rows(lengths):
    return [Row(prepared=None, multivector=False, dimensions=None, ticket=None, position=i, tokens=n, adapter=None)
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
