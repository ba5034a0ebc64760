"""The model side of a batch, wherever the model runs: load the model a server's settings ask for, make it ready
to serve, and run a batch of rows through it (`ModelRunner`: collate, one forward, per-row retry, matryoshka
truncation, one device-to-host copy)."""

from __future__ import annotations

import logging
import os
import time

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


class ModelRunner:
    """A batch of rows -> one outcome per row (a float32 numpy vector, or the exception that row raised)."""

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
        started, cpu = time.perf_counter(), time.thread_time()
        outcomes = self._run(rows, collated)
        return outcomes, ForwardTimes(time.perf_counter() - started, time.thread_time() - cpu)

    def _run(self, rows: list[EmbeddingRow], collated) -> list[RowOutcome]:
        try:
            if collated is not None:
                return self._embed(rows, collated)
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
            log.warning("batch of %d rows failed (%s); retrying rows one by one", len(rows), exc)
        outcomes = []
        for row in rows:
            try:
                outcomes.extend(self._embed([row], None))
            except Exception as exc:  # noqa: BLE001 - isolated to this row
                outcomes.append(exc)
        return outcomes

    def _embed(self, rows: list[EmbeddingRow], collated) -> list[RowOutcome]:
        vectors = self.model.embed_prepared([row.prepared for row in rows], [row.multivector for row in rows],
                                            collated=collated)
        out = []
        for row, vector in zip(rows, vectors, strict=True):
            if isinstance(vector, Exception):  # this row's own error (a non-finite vector): its request only
                out.append(vector)
                continue
            if not row.multivector and row.dimensions is not None:
                vector = self.model.truncate(vector, row.dimensions)
            out.append(vector.float().numpy())
        return out
