"""The model side of a batch, wherever the model runs: load the model a server's settings ask for, make it ready
to serve, and run a batch of rows through it (`ModelRunner`: collate, one forward, per-row retry, matryoshka
truncation, one device-to-host copy)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

from ..rows import EmbeddingRow, ForwardTimes, RowOutcome

log = logging.getLogger("serve.engine")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_model_for(settings):
    """The model a server with these settings serves (device, dtype, chat template, adapter limits)."""
    import torch

    from nova.loading import load_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = None if settings.device == "auto" else settings.device
    dtype = getattr(torch, DTYPES[settings.dtype]) if settings.dtype != "auto" else None
    trust = True if settings.model is None else settings.trust_remote_code
    return load_model(settings.model, device=device, dtype=dtype, chat_template=settings.chat_template,
                      max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank, trust_remote_code=trust)


def prepare_for_serving(model, settings) -> None:
    """Once a model object exists: the prefix cache size, batch padding, `--load-lora` adapters and a warm-up
    forward."""
    from ..adapters import peft_folder

    model.prefix_cache.configure(settings.prefix_cache_mb << 20)
    model.pad_to_multiple_of = settings.pad_to_multiple_of or None
    if settings.cuda_graphs:  # buckets up to the largest batch the batcher forms
        model.configure_cuda_graphs(True, max_rows=settings.max_batch_size)
    for name, path in settings.load_lora:
        folder = os.path.realpath(peft_folder(path))
        resident = model.list_adapters().get(name)
        if resident is not None:  # e.g. the model card's --load-lora retrieval=<the checkpoint's own folder>
            if os.path.realpath(str(resident.get("path"))) != folder:
                raise ValueError(f"--load-lora {name}={path}: an adapter {name!r} is already loaded from "
                                 f"{resident.get('path')}; load this one under another name")
            log.info("adapter %r: already loaded from %s", name, folder)
            continue
        model.load_adapter(name, folder)
        log.info("adapter %r loaded from %s", name, path)
    row = model.processor.prepare_item("warm-up", index=0, allow_paths=False)
    model.embed_prepared([row], False, collated=model.collate_rows([row]))


class PendingVectors(Protocol):
    """What a model's `launch_prepared` returns (the model's `PendingOutcomes`, the stand-in's
    `WaitedOutcomes`)."""

    @property
    def ready(self) -> bool: ...  # whether result() returns without waiting for a device

    def result(self) -> list: ...  # one vector (torch) or error per row, once on the host

    def device_seconds(self) -> float | None: ...  # the device's time for it, where the device reports one


@dataclass
class LaunchedForward:
    """A batch's forward, launched: its rows and either the pending outputs or, when the batch forward failed
    and its rows were run one by one, their outcomes already."""

    rows: list[EmbeddingRow]
    pending: PendingVectors | None
    outcomes: list[RowOutcome] | None
    seconds: float  # wall time of the launch
    thread_cpu_seconds: float  # the launching thread's CPU time: what it held the GIL for, at most
    ahead: bool = False  # the device still ran the forward when the launch returned

    @property
    def ready(self) -> bool:
        """Whether `ModelRunner.finish` returns without waiting for a device."""
        return self.pending is None or self.pending.ready


class ModelRunner:
    """A batch of rows -> one outcome per row (a float32 numpy vector, or the exception that row raised).
    `launch` then `finish`, so that an engine can launch the next batch while a device still runs this one;
    `run` does both."""

    def __init__(self, model):
        self.model = model

    def collate(self, rows: list[EmbeddingRow]):
        """Batch tensors for `rows`, or None if collation failed (the rows are then run one by one)."""
        try:
            return self.model.collate_rows([row.prepared for row in rows])
        except Exception:  # noqa: BLE001 - run() retries the rows one by one and reports each row's error
            return None

    def run(self, rows: list[EmbeddingRow], collated) -> tuple[list[RowOutcome], ForwardTimes]:
        """One forward (or, if it fails, one per row). Returns (outcomes, its times)."""
        return self.finish(self.launch(rows, collated))

    def launch(self, rows: list[EmbeddingRow], collated) -> LaunchedForward:
        """Queue one forward over `rows`; if it fails, run them one by one (each row's error its own)."""
        started, cpu = time.perf_counter(), time.thread_time()
        pending, outcomes = None, None
        if collated is None:  # collation failed: each row's error is its own
            outcomes = [self._alone(row) for row in rows]
        else:
            try:
                pending = self.model.launch_prepared([row.prepared for row in rows],
                                                     [row.multivector for row in rows], collated=collated)
            except Exception as exc:  # noqa: BLE001 - isolated below
                if len(rows) == 1:
                    outcomes = [exc]
                else:
                    log.warning("batch of %d rows failed (%s); retrying rows one by one", len(rows), exc)
                    outcomes = [self._alone(row) for row in rows]
        return LaunchedForward(rows, pending, outcomes, time.perf_counter() - started, time.thread_time() - cpu,
                               ahead=pending is not None and not pending.ready)

    def finish(self, launched: LaunchedForward) -> tuple[list[RowOutcome], ForwardTimes]:
        """Wait for a launched forward's vectors -> (one outcome per row, the forward's times). The forward's
        seconds are its device time where the device reports it (a GPU), else the launch's wall time."""
        device_seconds = None
        if launched.outcomes is not None:
            outcomes = launched.outcomes
        else:
            try:
                outcomes = self._finished(launched.rows, launched.pending.result())
                device_seconds = launched.pending.device_seconds()
            except Exception as exc:  # noqa: BLE001 - a device error surfacing at the wait: every row has it
                outcomes = [exc] * len(launched.rows)
        seconds = launched.seconds if device_seconds is None else device_seconds
        return outcomes, ForwardTimes(seconds, launched.thread_cpu_seconds, launched.seconds if launched.ahead else 0.0)

    def _alone(self, row: EmbeddingRow) -> RowOutcome:
        """One row's own forward, when its batch's failed: its error is its own."""
        try:
            return self._finished([row], self.model.embed_prepared([row.prepared], [row.multivector]))[0]
        except Exception as exc:  # noqa: BLE001 - isolated to this row
            return exc

    def _finished(self, rows: list[EmbeddingRow], vectors: list) -> list[RowOutcome]:
        """The model's per-row outputs -> what a row's request gets: its matryoshka size, as numpy. A row's
        error (a non-finite vector, a size it cannot have) is its request's only."""
        out: list[RowOutcome] = []
        for row, vector in zip(rows, vectors, strict=True):
            if isinstance(vector, Exception):
                out.append(vector)
                continue
            try:
                if not row.multivector and row.dimensions is not None:
                    vector = self.model.truncate(vector, row.dimensions)
                out.append(vector.float().numpy())
            except Exception as exc:  # noqa: BLE001 - this row's own
                out.append(exc)
        return out
