"""The typed objects that cross the server's layers: one `EmbeddingRow` per input item, from the route that
prepared it through admission, the batcher and the engine (in this process or the model's), and one
`BatchResult` per forward on the way back.

A row is built once (`EmbeddingRow.of`), after its item is tokenized and its adapter resolved; nothing
downstream resolves, re-validates or reshapes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# What a row comes back as: its vector (float32; [dim] pooled, or [n_tokens, 128] multi-vector), or the
# exception that row raised (its own request fails with it; the batch's other rows are unaffected).
RowOutcome = np.ndarray | BaseException


@dataclass(frozen=True, eq=False)
class EmbeddingRow:
    """One item on its way to the model: the tokenized item (a `PreparedItem` of the model's processor), what
    to return, and its weight in the batcher's token budgets."""

    prepared: Any  # PreparedItem (the model's remote code defines the class; the server never imports it)
    multivector: bool  # per-token vectors instead of the pooled one
    dimensions: int | None  # matryoshka truncation of the pooled vector; None: full size (always for multi)
    tokens: int  # the weight in the token budgets: tokens, plus an image's vision-tower patches

    @classmethod
    def of(cls, prepared, *, multivector: bool, dimensions: int | None) -> EmbeddingRow:
        return cls(prepared, multivector, None if multivector else dimensions, budget_tokens(prepared))

    @property
    def adapter(self) -> str | None:
        """The adapter the processor resolved for this item (None: the base model)."""
        return self.prepared.adapter

    @property
    def position(self) -> int:
        """The item's index in its own request (errors name it)."""
        return self.prepared.index

    @property
    def carries_image(self) -> bool:
        return self.prepared.pixel_values is not None or self.prepared.image_embeds is not None


def budget_tokens(prepared) -> int:
    """A row's weight in the token budgets: its tokens, plus its image's patches before the 2x2 merge (the vision
    tower runs on those, so an image costs more than its merged tokens say)."""
    if prepared.pixel_values is None or prepared.image_grid_thw is None:
        return prepared.num_tokens
    return prepared.num_tokens + int(prepared.image_grid_thw.prod())


@dataclass(frozen=True)
class PackedRows:
    """A batch of rows as it crosses to the model process: columns, not an object per row. The items are the
    processor's `PackedItems` (each token field of every row one flat array); the row fields are one list each.
    The model process unpacks it into the same rows, whose token fields are then views of those arrays
    (bench/bench_pipe.py: what this saves each side)."""

    items: Any  # PackedItems (the model's remote code defines the class)
    multivector: list[bool]
    dimensions: list[int | None]
    tokens: list[int]

    @classmethod
    def of(cls, rows: list[EmbeddingRow], processor) -> PackedRows:
        return cls(processor.pack([row.prepared for row in rows]), [row.multivector for row in rows],
                   [row.dimensions for row in rows], [row.tokens for row in rows])

    def unpack(self) -> list[EmbeddingRow]:
        return [EmbeddingRow(prepared, multivector, dimensions, tokens) for prepared, multivector, dimensions, tokens
                in zip(self.items.unpack(), self.multivector, self.dimensions, self.tokens, strict=True)]


@dataclass(frozen=True)
class ForwardShape:
    """What one forward ran: its rows, its longest row's budget tokens and how many adapters it mixed. A model
    process serving several HTTP workers runs their waiting batches in one forward; each worker's cost model
    then learns from the forward that ran, not from its own part of it."""

    rows: int
    longest: int
    adapters: int

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.longest

    @classmethod
    def of(cls, rows: list[EmbeddingRow]) -> ForwardShape:
        return cls(len(rows), max(row.tokens for row in rows), len({row.adapter for row in rows}))


@dataclass(frozen=True)
class ForwardTimes:
    """What one forward took: seconds (on a GPU, the device's time for the forward and its copy to the host;
    elsewhere the launch's wall time), and CPU seconds of the thread that launched it. On a GPU that is the
    host work the launching thread does per batch, the time it needs Python's GIL (the wait for the vectors
    happens on another thread); with the stand-in it is that work plus the synthesis of its vectors; on a
    CPU it is the forward's own compute (OpenMP's other threads not counted). `launch_seconds`: the launch's
    wall time when the device still ran the forward as the launch returned (a GPU): host work that must end
    before the device frees up, or the device waits for the next forward; 0 when the launch returned with the
    vectors (a CPU, whose launch is the forward)."""

    seconds: float
    thread_cpu_seconds: float
    launch_seconds: float = 0.0


@dataclass
class BatchResult:
    """One batch's answer from an engine: an outcome per row (in the batch's order) and where the time went.
    `forward` is set when the batch ran inside a larger forward (other workers' batches joined it)."""

    outcomes: list[RowOutcome]
    collate_seconds: float
    forward_seconds: float
    forward: ForwardShape | None = None
    forward_cpu_seconds: float = 0.0  # the launching thread's CPU time for the forward (ForwardTimes)
    launch_seconds: float = 0.0  # the launch's wall time, where it ran ahead of the device (ForwardTimes)
    # time.monotonic() when the batch was collated, ready to launch. CLOCK_MONOTONIC is one clock for every
    # process of the machine, so the server can time a hand-off to its model process end to end with it.
    ready_at: float | None = None

    def __reduce__(self):
        """Across the model process's pipe, a batch whose outcomes are all vectors of one shape (the usual
        pooled batch) travels as one array: one buffer to pickle and copy instead of an array per row (a
        64-row reply: bench/bench_pipe.py); its rows come back as views of that array."""
        outcomes = self.outcomes
        if outcomes and all(isinstance(o, np.ndarray) and o.shape == outcomes[0].shape and o.dtype == outcomes[0].dtype
                            for o in outcomes):
            outcomes = _StackedRows(np.stack(outcomes))
        return (_batch_result, (outcomes, self.collate_seconds, self.forward_seconds, self.forward,
                                self.forward_cpu_seconds, self.launch_seconds, self.ready_at))


@dataclass(frozen=True)
class _StackedRows:
    """A batch's row vectors as one array [rows, ...], as `BatchResult` pickles them."""

    array: np.ndarray


def _batch_result(outcomes, collate_seconds: float, forward_seconds: float, forward,
                  forward_cpu_seconds: float, launch_seconds: float, ready_at: float | None) -> BatchResult:
    if isinstance(outcomes, _StackedRows):
        outcomes = list(outcomes.array)
    return BatchResult(outcomes, collate_seconds, forward_seconds, forward, forward_cpu_seconds, launch_seconds,
                       ready_at)
