"""The Ray Data runner: read -> load -> model stages, committed shard by shard on the driver.

- read (tasks): a pending shard's descriptor -> its rows (`inputs.read_shard`).
- load (tasks): defaults applied, images read and decoded (`stages.load_items`); by the model's processor, loaded
  once per worker process without the weights (`stages.prepare_records`), text items rendered and tokenized and
  images resized to the model's input size.
- model (an actor pool, `--workers` actors, one GPU each when the cluster has GPUs): `stages.ModelWorker`, which
  routes, packs and embeds text rows that arrive tokenized, so a GPU does not wait while its actor tokenizes;
  it patchifies the fitted images itself, between launches (patches take 8x an image's object-store space).
- the driver streams results, keeps each row once per (shard, position), and commits a shard as soon as
  all of its rows are in. Ray retries the work of a killed actor on a restarted one (Ray Data's actor pool
  restarts actors and retries their tasks); a row delivered twice is dropped by the driver, a shard with a
  missing row is never committed, so the output holds every row exactly once.

Records travel between stages pickled in a binary column, so PIL images and ragged arrays pass unchanged.
"""

from __future__ import annotations

import functools
import logging
import pickle

from .inputs import read_shard
from .job import Job
from .output import OutputFolder
from .stages import ModelWorker, load_items, prepare_records

log = logging.getLogger("nova.embed")

# Rows handed to a model actor per call, packed by token budget inside: several packs a call, so that the actor
# launches one while it reads another and patchifies the next images, and the call's own overhead is shared
# (bench/bench_encode_ahead.py --loop nova-embed-ray).
ROWS_PER_MODEL_CALL = 256


def _pack(records: list[dict], shard: int) -> dict:
    return {"shard": [shard] * len(records), "payload": [pickle.dumps(r, protocol=5) for r in records]}


def _unpack(batch: dict) -> tuple[list[int], list[dict]]:
    return [int(s) for s in batch["shard"]], [pickle.loads(p) for p in batch["payload"]]


def _read_stage(batch: dict, job: Job) -> dict:
    shards = {s.index: s for s in job.pending}
    out: dict = {"shard": [], "payload": []}
    for index in batch["shard"]:
        packed = _pack(read_shard(job.plan, shards[int(index)]), int(index))
        out["shard"] += packed["shard"]
        out["payload"] += packed["payload"]
    return out


@functools.lru_cache(maxsize=2)
def _processor(model_ref: str | None, trust_remote_code: bool):
    """The model's processor, loaded once per Ray worker process (a load task reuses its process)."""
    from nova.loading import load_processor

    return load_processor(model_ref, trust_remote_code=True if model_ref is None else trust_remote_code)


def _load_stage(batch: dict, job: Job) -> dict:
    shards, records = _unpack(batch)
    loaded = load_items(records, job.defaults, job.model["max_image_pixels"])
    prepared = prepare_records(loaded, _processor(job.model_ref, job.trust_remote_code), job.options)
    return {"shard": shards, "payload": [pickle.dumps(r, protocol=5) for r in prepared]}


class ModelStage:
    """The actor class of the model stage (its name shows in `ray list actors`)."""

    def __init__(self, worker_kwargs: dict):
        self.worker = ModelWorker(**worker_kwargs)

    def __call__(self, batch: dict) -> dict:
        shards, records = _unpack(batch)
        results = self.worker.embed(records)
        return {"shard": shards, "payload": [pickle.dumps(r, protocol=5) for r in results]}


def cluster_workers(workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else `workers` CPU actors."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else 1
    return workers, gpus_per_worker


def run_ray(job: Job, folder: OutputFolder, progress, *, address: str | None, workers: int | None,
            gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0, quiet: bool = True) -> None:
    """`quiet`: Ray's own console output stays in its session logs (`nova.ray_init`); otherwise it and the
    workers' output reach this terminal."""
    import ray

    from nova.ray_init import init_ray, quiet_ray_data

    started_here = init_ray(address, log_to_driver=not quiet, quiet=quiet)
    quiet_ray_data(quiet)
    try:
        _run(job, folder, progress, workers, gpus_per_worker, cpus_per_worker)
    finally:
        if started_here:
            ray.shutdown()


def _run(job, folder, progress, workers, gpus_per_worker, cpus_per_worker) -> None:
    import ray

    workers, gpus_per_worker = cluster_workers(workers, gpus_per_worker)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Rows reach the driver in input order, so shards complete (and are written) one after another and
    # the driver buffers about one shard, not a part of every shard; the stages still run ahead.
    context.execution_options.preserve_order = True
    log.info("Ray: %d model actor(s), %g GPU and %g CPU each", workers, gpus_per_worker, cpus_per_worker)
    shards = {s.index: s for s in job.pending}
    ds = ray.data.from_items([{"shard": s.index} for s in job.pending], override_num_blocks=len(job.pending))
    # Read and load are light tasks that reserve no CPU (so that they are never starved by model actors that
    # reserve every CPU of a node), at most two of each at a time; the model stage is a fixed pool of actors,
    # restarted and retried by Ray Data when one dies.
    light = {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=2)}
    ds = ds.map_batches(_read_stage, fn_kwargs={"job": job}, batch_size=1, **light)
    # batch_size=None: a load task takes the block of one shard as it comes (a row count here would make
    # Ray Data bundle every shard into one task, and nothing would stream).
    ds = ds.map_batches(_load_stage, fn_kwargs={"job": job}, batch_size=None, **light)
    ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"worker_kwargs": job.worker_kwargs()},
                        batch_size=ROWS_PER_MODEL_CALL, compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    buffers: dict[int, dict[int, dict]] = {}
    committed: set[int] = set()
    duplicates = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, record in zip(*_unpack(batch), strict=True):
            buffer = buffers.setdefault(index, {}) if index not in committed else None
            if buffer is None or record["position"] in buffer:
                duplicates += 1
                continue
            buffer[record["position"]] = record
            progress.update(1)
            if len(buffer) == shards[index].rows:
                folder.commit(shards[index], list(buffer.values()))
                committed.add(index)
                del buffers[index]
    if duplicates:
        log.warning("%d row(s) were delivered twice by retried work and written once", duplicates)
    if buffers or committed != set(shards):
        missing = sorted(set(shards) - committed)
        raise RuntimeError(f"Ray finished without every row of shard(s) {missing[:10]}; they were not written "
                           "(run the same command again to finish them)")
