"""`nova embed INPUT OUT_DIR`: flags -> Job -> the Ray Data runner (default) or the single-process one."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time

from nova.argtypes import lora_spec, positive_int

from .inputs import InputError, plan_input
from .job import Job
from .output import OutputFolder, SettingsMismatch, model_identity
from .stages import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, EmbedOptions, ItemDefaults

INSTALL_RAY = "pip install 'nova-embeddings[ray]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed a corpus (JSONL, Parquet or a BEIR folder) into Parquet files with columns `id` and `embedding` "
        "(or `multivector`), on Ray Data (a local Ray by default) or in one process (--no-ray). Resumable: run "
        "the same command again to finish an interrupted run. See docs/scale-out.md."
    )
    parser.add_argument("input", metavar="INPUT", help="a .jsonl or .parquet file, or a BEIR folder (corpus.jsonl)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; resumed if it holds a run)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="Nova/Jina V4 directory or hub id (default: the bundled tiny "
                                                 "random-weight checkpoint)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the model directory's remote code")
    g.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when the worker has one)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="(default: %(default)s = float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--load-lora", action="append", type=lora_spec, default=[], metavar="NAME=PATH",
                   help="load a PEFT adapter folder into every worker; repeatable")
    g = parser.add_argument_group("items (a row's own field wins over these)")
    g.add_argument("--task", default=None, help="task of rows that name none (default: the model's default task)")
    g.add_argument("--adapter", default=None, help="adapter of rows that name none; 'none' = base model "
                                                   "(default: the task's adapter)")
    g.add_argument("--instructions", default=None, help="instructions for rows that have none")
    g.add_argument("--dimensions", type=int, default=None, help="Matryoshka size of pooled vectors")
    g.add_argument("--multivector", action="store_true", help="write per-token 128-d rows (`multivector`)")
    g.add_argument("--max-pixels", type=positive_int, default=None, help="resize images to at most this many pixels")
    g.add_argument("--max-length", type=positive_int, default=8192,
                   help="tokens per item; longer text is truncated (default: %(default)s)")
    g.add_argument("--prompt-set", default=None, help="alternative prompt set of the model's config")
    g.add_argument("--id-field", default=None, help="id column (default: 'id', or '_id' when there is no 'id')")
    g = parser.add_argument_group("execution")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="model actors (default: one per GPU of the cluster, else 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per model actor (default: %(default)s)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--ray-address", default=None,
                       help="join a Ray cluster (e.g. auto, ray://head:10001) (default: start a local Ray)")
    where.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    g.add_argument("--shard-rows", type=positive_int, default=2000,
                   help="rows per output part: the unit of commit and resume (default: %(default)s)")
    g.add_argument("--max-batch-tokens", type=positive_int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="padded tokens per forward pass (default: %(default)s)")
    g.add_argument("--max-batch-size", type=positive_int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="rows per forward pass (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_job(args: argparse.Namespace) -> Job:
    plan = plan_input(args.input, args.shard_rows, args.id_field)
    options = EmbedOptions(
        multivector=args.multivector, dimensions=args.dimensions, max_pixels=args.max_pixels,
        max_length=args.max_length, prompt_set=args.prompt_set, max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size, load_lora=[(name, _abspath(path)) for name, path in args.load_lora],
    )
    return Job(plan=plan, model_ref=args.model, model=model_identity(args.model),
               defaults=ItemDefaults(args.task, args.adapter, args.instructions), options=options,
               shard_rows=args.shard_rows, device=args.device, dtype=args.dtype,
               trust_remote_code=args.trust_remote_code)


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(path)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_ray = not args.no_ray
    if args.no_ray and (args.workers is not None or args.gpus_per_worker is not None):
        print("nova embed: --workers and --gpus-per-worker need Ray (drop --no-ray)", file=sys.stderr)
        return 2
    if use_ray and importlib.util.find_spec("ray") is None:
        if args.ray_address:
            print(f"nova embed: --ray-address needs Ray: {INSTALL_RAY}", file=sys.stderr)
            return 2
        print(f"nova embed: Ray is not installed, so this runs in one process (same output). For several "
              f"workers, GPUs or a cluster: {INSTALL_RAY}", file=sys.stderr)
        use_ray = False
    try:
        job = build_job(args)
        if args.dimensions is not None and args.multivector:
            raise ValueError("--dimensions applies to pooled vectors only, not with --multivector")
        folder = OutputFolder(args.out_dir, job.settings())
        folder.open()
    except (InputError, SettingsMismatch, ValueError, OSError) as exc:
        print(f"nova embed: {exc}", file=sys.stderr)
        return 2
    done = folder.done_shards()
    job.pending = [s for s in job.plan.shards if s.index not in done]
    todo = sum(s.rows for s in job.pending)
    if done:
        print(f"nova embed: resuming: {len(done)} of {len(job.plan.shards)} part(s) already written", file=sys.stderr)
    started = time.perf_counter()
    try:
        with tqdm(total=todo, unit="row", disable=args.no_progress or not todo, file=sys.stderr) as progress:
            if todo and use_ray:
                from .ray_pipeline import run_ray

                run_ray(job, folder, progress, address=args.ray_address, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
            elif todo:
                from .local import run_local

                run_local(job, folder, progress)
    except Exception as exc:  # a worker that cannot load the model, a cluster that went away, ...
        logging.getLogger("nova.embed").debug("run failed", exc_info=True)
        print(f"nova embed: the run stopped: {type(exc).__name__}: {exc}\nThe parts written so far are kept; "
              "run the same command again to finish.", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    summary = folder.finish()
    rate = todo / elapsed if elapsed > 0 else 0.0
    print(f"nova embed: {summary['rows']} rows embedded, {summary['errors']} in error "
          f"({summary['errors_file']}); this run: {todo} rows in {elapsed:.1f}s = {rate:.1f} rows/s "
          f"({'Ray' if use_ray else 'one process'}) -> {args.out_dir}")
    return 0
