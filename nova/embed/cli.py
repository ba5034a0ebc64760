"""`nova embed INPUT OUT_DIR`: flags -> Job -> the Ray Data runner (default) or the single-process one."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from nova.argtypes import lora_spec, positive_int
from nova.command import (
    add_log_level,
    check_adapter_path,
    is_debug,
    prepare_output_folder,
    run_command,
    warn_random_weights,
)
from nova.evaluation.errors import UserInputError
from nova.model_config import ModelConfig, read_model_config
from nova.ray_init import INSTALL_RAY

from .inputs import plan_input
from .job import Job
from .output import MANIFEST, RUN_FILES, OutputFolder, model_identity
from .stages import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, EmbedOptions, ItemDefaults

PROG = "nova embed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed a corpus (JSONL, Parquet or a BEIR folder) into Parquet files with columns `id` and `embedding` "
        "(or `multivector`), on Ray Data (a local Ray by default) or in one process (--no-ray). Rows are "
        "embedded as passages (documents) unless --task or a row's own 'task' says otherwise. Resumable: "
        "run the same command with --resume to finish an interrupted run. See docs/scale-out.md."
    )
    parser.add_argument("input", metavar="INPUT", help="a .jsonl or .parquet file, or a BEIR folder (corpus.jsonl)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="output folder (created; an existing one that holds files needs --resume or "
                             "--overwrite)")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="Nova/Jina V4 directory or hub id (default: the bundled tiny "
                                                 "random-weight checkpoint)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model directory's own remote code (needed for Nova directories that carry "
                        "*_nova_embeddings_v1.py; the bundled checkpoint is always trusted) (default: off)")
    g.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when the worker has one)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    g.add_argument("--load-lora", action="append", type=lora_spec, default=[], metavar="NAME=PATH",
                   help="load a PEFT adapter folder into every worker; repeatable (default: none)")
    g = parser.add_argument_group("items (a row's own field wins over these)")
    g.add_argument("--task", default=None,
                   help="task of rows that name none (default: the passage side of the model's default task, "
                        "retrieval.passage for Nova: a corpus is embedded as passages; retrieval.query embeds "
                        "queries)")
    g.add_argument("--adapter", default=None, help="adapter of rows that name none; 'none' = base model "
                                                   "(default: the task's adapter)")
    g.add_argument("--instructions", default=None, help="instructions for rows that have none (default: none)")
    g.add_argument("--dimensions", type=int, default=None,
                   help="Matryoshka size of pooled vectors (default: the model's full size)")
    g.add_argument("--multivector", action="store_true", help="write per-token 128-d rows (`multivector`)")
    g.add_argument("--max-pixels", type=positive_int, default=None,
                   help="resize images to at most this many pixels (default: the image processor's own limit)")
    g.add_argument("--max-length", type=positive_int, default=8192,
                   help="tokens per item; longer text is truncated (default: %(default)s)")
    g.add_argument("--prompt-set", default=None,
                   help="alternative prompt set of the model's config, e.g. descriptive (default: the task's own "
                        "prompt)")
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
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay text-only batches through CUDA graphs (same vectors; needs CUDA) (default: off)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("output folder")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="finish the run in OUT_DIR: its committed parts are kept, the settings must be the "
                            "same")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in OUT_DIR: its parts, errors and manifest are deleted first")
    add_log_level(parser)


def build_job(args: argparse.Namespace, task: str) -> Job:
    plan = plan_input(args.input, args.shard_rows, args.id_field)
    options = EmbedOptions(
        multivector=args.multivector, dimensions=args.dimensions, max_pixels=args.max_pixels,
        max_length=args.max_length, prompt_set=args.prompt_set, max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size, load_lora=[(name, os.path.abspath(path)) for name, path in args.load_lora],
        cuda_graphs=args.cuda_graphs,
    )
    return Job(plan=plan, model_ref=args.model, model=model_identity(args.model),
               defaults=ItemDefaults(task, args.adapter, args.instructions), options=options,
               shard_rows=args.shard_rows, device=args.device, dtype=args.dtype,
               trust_remote_code=args.trust_remote_code)


def default_route(args: argparse.Namespace, model: ModelConfig):
    """The task, prompt and adapter of rows that name no task: a corpus is embedded as passages by default."""
    task = args.task or model.passage_task()
    try:
        return model.route(task, args.adapter, args.prompt_set)
    except ValueError as exc:
        flag = "--prompt-set" if getattr(exc, "field", None) == "prompt_set" else "--task"
        raise UserInputError(f"{flag}: {exc}") from None


def announce(model: ModelConfig, route) -> None:
    """The run's first lines: random weights, and which side (task, prompt) rows without a task are embedded as."""
    warn_random_weights(PROG, model.random_weights)
    adapter = route.adapter or "none (base model)"
    print(f"{PROG}: rows without a 'task' are embedded as {route.task} (prompt {route.prompt!r}, adapter "
          f"{adapter}); a row's own 'task' wins", file=sys.stderr)
    passage = model.passage_task(route.task)
    if passage != route.task:
        print(f"{PROG}: note: --task {route.task} embeds rows as queries; a corpus is embedded with --task "
              f"{passage}", file=sys.stderr)


def check_settings(args: argparse.Namespace) -> ModelConfig:
    """Everything that can be checked before a model loads (on Ray: before a cluster starts)."""
    if args.no_ray and (args.workers is not None or args.gpus_per_worker is not None):
        raise UserInputError("--workers and --gpus-per-worker need Ray (drop --no-ray)")
    if args.cuda_graphs and (args.device or "").startswith("cpu"):
        raise UserInputError("--cuda-graphs needs CUDA (drop --device cpu)")
    if args.dimensions is not None and args.multivector:
        raise UserInputError("--dimensions applies to pooled vectors only, not with --multivector")
    model = read_model_config(args.model, trust_remote_code=args.trust_remote_code)
    try:
        model.check_dimensions(args.dimensions)
    except ValueError as exc:
        raise UserInputError(f"--dimensions: {exc}") from None
    for name, path in args.load_lora:
        check_adapter_path(f"--load-lora {name}={path}", path)
    return model


def check_out_dir(args: argparse.Namespace) -> None:
    out = Path(args.out_dir)
    if args.resume and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserInputError(f"--resume: {out} holds no `nova embed` run to finish (no {MANIFEST}); choose "
                             "another folder")
    prepare_output_folder(out, prog=PROG, ours=RUN_FILES, overwrite=args.overwrite, resume=args.resume,
                          resumable=True, flag="OUT_DIR")


@run_command(PROG, interrupted=": the parts written so far are kept; run the same command with --resume to finish")
def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    use_ray = not args.no_ray
    if use_ray and importlib.util.find_spec("ray") is None:
        if args.ray_address:
            raise UserInputError(f"--ray-address needs Ray: {INSTALL_RAY}")
        print(f"{PROG}: Ray is not installed, so this runs in one process (same output). For several "
              f"workers, GPUs or a cluster: {INSTALL_RAY}", file=sys.stderr)
        use_ray = False
    model = check_settings(args)
    route = default_route(args, model)
    job = build_job(args, route.task)
    check_out_dir(args)  # last: --overwrite deletes only once everything else has passed
    folder = OutputFolder(args.out_dir, job.settings())
    folder.open()
    announce(model, route)
    done = folder.done_shards()
    job.pending = [s for s in job.plan.shards if s.index not in done]
    todo = sum(s.rows for s in job.pending)
    if done:
        print(f"{PROG}: resuming: {len(done)} of {len(job.plan.shards)} part(s) already written", file=sys.stderr)
    started = time.perf_counter()
    try:
        with tqdm(total=todo, unit="row", disable=args.no_progress or not todo, file=sys.stderr) as progress:
            if todo and use_ray:
                from .ray_pipeline import run_ray

                run_ray(job, folder, progress, address=args.ray_address, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                        quiet=not is_debug(args))
            elif todo:
                from .local import run_local

                run_local(job, folder, progress)
    except Exception as exc:  # a worker that cannot load the model, a cluster that went away, ...
        logging.getLogger("nova.embed").debug("run failed", exc_info=True)
        lines = str(exc).strip().splitlines()
        hint = "" if is_debug(args) else " (--log-level debug shows the traceback)"
        print(f"{PROG}: error: the run stopped: {type(exc).__name__}: {lines[0] if lines else ''}; the parts "
              f"written so far are kept, run the same command with --resume to finish{hint}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    summary = folder.finish()
    rate = todo / elapsed if elapsed > 0 else 0.0
    print(f"{PROG}: {summary['rows']} rows embedded, {summary['errors']} in error "
          f"({summary['errors_file']}); this run: {todo} rows in {elapsed:.1f}s = {rate:.1f} rows/s "
          f"({'Ray' if use_ray else 'one process'}) -> {args.out_dir}")
    return 0
