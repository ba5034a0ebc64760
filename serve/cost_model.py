"""The batcher's forward-cost model (`BatchCostModel`): how long a forward of a batch will take, and the cheapest
split of a candidate batch into length-sorted groups.

Its own module because it is numerics, not queueing: it knows a row only by its length and adapter
(`CostedRow`), and the batcher (batcher.py) feeds it measured forwards and asks it which group to run now.
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol, TypeVar

import numpy as np


class CostedRow(Protocol):
    """What the cost model reads of a row (rows.EmbeddingRow, batcher.QueuedRow): its length in tokens and its
    adapter."""

    tokens: int
    adapter: str | None


RowT = TypeVar("RowT", bound=CostedRow)


class BatchCostModel:
    """`seconds ~ a + b * padded_tokens + c * adapters_in_batch`, a non-negative least-squares fit over recent
    batches; splits candidate batches into contiguous length-sorted groups when that lowers the predicted total
    time. (Each distinct adapter in a forward costs its own per-module work, so splitting a mixed-adapter batch
    is dearer than splitting a single-adapter one.)

    Two rules keep a bad fit from splitting batches that should stay whole:
    - the first forward of each batch shape (rows, longest row) is not learned from: it pays one-time costs
      (on a GPU it can cost as much as a whole forward: docs/performance.md, "New batch shapes"), and a fit
      that read them as per-token cost would split every batch into single rows;
    - when the window cannot tell a per-token cost from noise (too little spread in sizes, or the best
      non-negative fit has none), nothing is split; a stale fit is never kept.
    """

    MAX_SHAPES = 65536  # shapes remembered as warm; past that every forward is learned from

    def __init__(self, window: int = 64, min_samples: int = 8):
        self.window = window
        self._samples = np.zeros((window, 3))  # (padded tokens, adapters, seconds), a ring buffer
        self._observed = 0
        self.min_samples = min_samples
        self.a: float | None = None
        self.b: float | None = None
        self.c: float = 0.0
        self._warm_shapes: set[tuple[int, int]] = set()

    def observe(self, padded_tokens: int, seconds: float, adapters: int = 1,
                shape: tuple[int, int] | None = None) -> None:
        """Learn from one forward. `shape` (rows, longest row), when given, skips the first forward of it."""
        if shape is not None and len(self._warm_shapes) < self.MAX_SHAPES and shape not in self._warm_shapes:
            self._warm_shapes.add(shape)
            return
        self._samples[self._observed % self.window] = (padded_tokens, adapters, seconds)
        self._observed += 1
        if self._observed < self.min_samples:
            return
        data = self._samples[: min(self._observed, self.window)]  # columns x (padded tokens), n, y (seconds)
        m = len(data)
        (sx, sn, sy), products = data.sum(axis=0).tolist(), (data.T @ data).tolist()
        (xx, xn, xy), (_, nn, ny), (_, _, yy) = products
        fit = (None, None, 0.0)  # no fit: nothing is split
        if xx / m - (sx / m) ** 2 >= (0.1 * sx / m) ** 2:  # else too little spread to tell a from b
            # the normal equations of seconds ~ a + b x + c n; the n column only where adapters vary
            gram, moments = [[m, sx, sn], [sx, xx, xn], [sn, xn, nn]], [sy, xy, ny]
            if nn * m - sn * sn <= 1e-9 * nn * m:
                gram, moments = [row[:2] for row in gram[:2]], moments[:2]
            a, b, c = _nonnegative_fit(gram, moments, yy)
            if b > 0:
                fit = (a, b, c)
        self.a, self.b, self.c = fit

    def predict(self, padded_tokens: int, adapters: int = 1) -> float | None:
        """Predicted seconds of one forward (None until the fit has data)."""
        if self.a is None or self.b is None:
            return None
        return self.a + self.b * padded_tokens + self.c * adapters

    def split(self, batch: list[RowT], anchor: RowT) -> list[RowT]:
        """The group of `batch` holding `anchor` in the cheapest split into length-sorted groups. Ties go to
        fewer groups: with a fitted fixed cost of 0, splitting rows of equal length costs exactly what keeping
        them together does; a tie broken the other way runs them as single-row batches."""
        if self.a is None or self.b is None or len(batch) < 2:
            return batch
        rows = sorted(batch, key=lambda r: r.tokens)
        n = len(rows)
        a, b, c = self.a, self.b, self.c
        # best[j]: cheapest cost of rows[:j] as contiguous groups; cut[j]: where the last group starts
        best = [0.0] + [float("inf")] * n
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            longest = rows[j - 1].tokens
            adapters: set = set()
            for i in range(j - 1, -1, -1):
                adapters.add(rows[i].adapter)
                cost = best[i] + a + b * (j - i) * longest + c * len(adapters)
                if cost <= best[j]:  # on a tie the longer last group (smaller i) wins
                    best[j], cut[j] = cost, i
        j = n
        while j > 0:
            i = cut[j]
            group = rows[i:j]
            if any(r is anchor for r in group):
                return group
            j = i
        return batch


def _nonnegative_fit(gram: list[list[float]], moments: list[float], total: float) -> list[float]:
    """Least squares with every coefficient >= 0, from the normal equations: `gram` is X'X, `moments` X'y and
    `total` y'y, for at most three columns. The best of the column subsets whose unconstrained solution is
    non-negative; unused columns come back as 0.0, padded to three values.

    Small systems in plain Python: this runs on the event loop after every batch, where numpy's per-call
    overhead is several times the arithmetic (bench/results/2026-11-27-cpu-server). Columns are scaled to unit
    norm first, so the systems stay well conditioned."""
    k = len(moments)
    scales = [math.sqrt(gram[i][i]) or 1.0 for i in range(k)]
    gram = [[gram[i][j] / (scales[i] * scales[j]) for j in range(k)] for i in range(k)]
    moments = [moments[i] / scales[i] for i in range(k)]
    best, best_error = [0.0] * k, total
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            coef = _solve([[gram[i][j] for j in subset] for i in subset], [moments[i] for i in subset])
            if coef is None or any(value < 0 for value in coef):
                continue
            # at the least-squares solution the residual sum of squares is y'y - coef . X'y
            error = total - sum(value * moments[i] for value, i in zip(coef, subset, strict=True))
            if error < best_error:
                best_error = error
                best = [0.0] * k
                for i, value in zip(subset, coef, strict=True):
                    best[i] = value / scales[i]
    return best + [0.0] * (3 - k)


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """`matrix @ x = rhs` for a small symmetric positive semi-definite matrix (Gaussian elimination with
    partial pivoting); None when it is singular (columns that cannot be told apart)."""
    n = len(rhs)
    rows = [list(row) + [value] for row, value in zip(matrix, rhs, strict=True)]
    tolerance = 1e-9 * max(abs(row[i]) for i, row in enumerate(rows))
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) <= tolerance:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (rows[r][n] - sum(rows[r][c] * x[c] for c in range(r + 1, n))) / rows[r][r]
    return x
