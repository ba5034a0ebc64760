"""The single-process runner: the same shards, stages and output as on Ray, one shard after another."""

from __future__ import annotations

from .inputs import read_shard
from .job import Job
from .output import OutputFolder
from .stages import ModelWorker, load_items


def run_local(job: Job, folder: OutputFolder, progress, model=None) -> None:
    worker = ModelWorker(model=model, **job.worker_kwargs())
    for shard in job.pending:
        records = load_items(read_shard(job.plan, shard), job.defaults, job.model["max_image_pixels"])
        folder.commit(shard, worker.embed(records))
        progress.update(shard.rows)
