"""`nova eval DATASET_DIR [--model PATH_OR_ID | --endpoint URL] [--variants FILE] [--instructions TEXT ...]
[--split test] --out DIR`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nova.command import (
    add_log_level,
    check_adapter_path,
    check_output_folder,
    clear_output,
    run_command,
    warn_random_weights,
)

from .errors import Problems, UserInputError
from .pipeline import evaluate_variants, load_in_process

PROG = "nova eval"
# What a run writes into --out (globs): what --overwrite deletes; a folder holding anything else is refused.
OUT_FILES = ("results.json", "results.txt", "runs", "plot.png")


class ListValues(argparse._ExtendAction):
    """`--instructions A B ...` (nargs='+'), remembering which list option came last: a DATASET_DIR typed after
    it is read by argparse as one more value of that list, and `recover_dataset` gives it back."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.last_list_option = (self.dest, option_string)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", metavar="DATASET_DIR",
                        help="BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (required)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where results.json, results.txt, runs/ and plot.png go; an existing folder that holds "
                             "files needs --overwrite (required)")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier `nova eval` wrote to --out")
    parser.add_argument("--split", default="test", help="qrels split (qrels/<split>.tsv) (default: %(default)s)")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--model", metavar="PATH_OR_ID",
                         help="in-process model (default: the tiny random-weight checkpoint)")
    backend.add_argument("--endpoint", metavar="URL",
                         help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080 (default: none, the "
                              "in-process model)")
    group = parser.add_argument_group("variants")
    group.add_argument("--variants", metavar="FILE",
                       help="YAML or JSON file of variants (see docs/training-and-evaluation.md) (default: none, "
                            "a 'baseline' variant plus one per flag below)")
    group.add_argument("--instructions", nargs="+", action=ListValues, metavar="TEXT",
                       help="one variant per instruction string, for the side --instructions-for names (default: "
                            "none)")
    group.add_argument("--instructions-for", choices=["query", "passage", "both"], default="query",
                       help="which side --instructions apply to (default: %(default)s)")
    group.add_argument("--adapters", nargs="+", action=ListValues, metavar="NAME",
                       help="one variant per adapter, 'none' = base model (default: none)")
    group.add_argument("--tasks", nargs="+", action=ListValues, metavar="TASK",
                       help="one variant per task: retrieval, code, text-matching (default: none)")
    group.add_argument("--dimensions", nargs="+", action=ListValues, metavar="N",
                       help="one variant per output size (default: none)")
    group.add_argument("--multivector", action="store_true", help="add a multi-vector (MaxSim) variant")
    group.add_argument("--task", help="task of the command-line variants (default: retrieval)")
    group.add_argument("--adapter", help="adapter of the command-line variants (default: the task's adapter)")
    group.add_argument("--baseline", metavar="NAME",
                       help="variant the others are compared with (default: the first)")
    model = parser.add_argument_group("in-process model")
    model.add_argument("--load-adapter", action="append", default=[], metavar="NAME=PATH",
                       help="load a PEFT adapter folder; repeatable (default: none)")
    model.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    model.add_argument("--batch-size", type=int, default=16,
                       help="items per forward pass, or per request with --endpoint where 16 means 32 "
                            "(default: %(default)s)")
    model.add_argument("--max-length", type=int, help="truncate items to this many tokens (default: no limit)")
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--endpoint-model",
                          help="'model' field of requests (default: the first of GET /v1/models)")
    endpoint.add_argument("--api-key", help="bearer token (default: $NOVA_API_KEY or $OPENAI_API_KEY)")
    endpoint.add_argument("--endpoint-format", choices=["nova", "openai"], default="nova",
                          help="nova: item objects with task/adapter/instructions; openai: plain strings "
                               "(default: %(default)s)")
    endpoint.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    scoring = parser.add_argument_group("scoring and outputs")
    scoring.add_argument("--metrics", nargs="+", action=ListValues, metavar="NAME@K",
                         help="extra metrics besides nDCG@10 P@10 MRR@10 Recall@100, e.g. nDCG@5 Recall@1000 MAP@100 "
                              "(default: none)")
    scoring.add_argument("--top-k", type=int, default=1000,
                         help="documents kept per query in the run files (default: %(default)s)")
    scoring.add_argument("--keep-identical-ids", action="store_true",
                         help="keep a document whose id equals the query id (BEIR drops them by default)")
    scoring.add_argument("--cache-dir",
                         help="corpus-embedding cache (default: $NOVA_EVAL_CACHE or ~/.cache/nova/eval-embeddings)")
    scoring.add_argument("--no-cache", action="store_true", help="do not read or write the corpus-embedding cache")
    scoring.add_argument("--per-query", action="store_true", help="also write per-query metrics into results.json")
    scoring.add_argument("--no-plot", action="store_true", help="skip plot.png")
    scoring.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_log_level(parser)


def recover_dataset(args) -> None:
    """DATASET_DIR typed after a list option (`--instructions A DATASET_DIR`) was read as one more value of it:
    the last value is the dataset when it names a folder; otherwise DATASET_DIR is missing, said explicitly."""
    if args.dataset is not None:
        return
    last = getattr(args, "last_list_option", None)
    if last is None:
        raise UserInputError("DATASET_DIR is missing: nova eval DATASET_DIR --out DIR [...]")
    dest, flag = last
    values = getattr(args, dest)
    if Path(values[-1]).is_dir():
        if len(values) == 1:
            raise UserInputError(f"{flag} has no value before DATASET_DIR {values[-1]}")
        args.dataset = values.pop()
        return
    raise UserInputError(f"DATASET_DIR is missing: after {flag}, argparse reads every word as one more {flag} "
                         f"value, so put DATASET_DIR first (nova eval DATASET_DIR --out DIR {flag} ...)")


def _parse_dimensions(values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    bad = [v for v in values if not v.lstrip("-").isdigit()]
    if bad:
        raise UserInputError(f"--dimensions takes whole numbers, got {', '.join(repr(v) for v in bad)}")
    return [int(v) for v in values]


def _parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    out, problems = [], Problems()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            problems.add(f"--load-adapter expects NAME=PATH, got {spec!r}")
            continue
        problems.attempt(check_adapter_path, f"--load-adapter {name}", path)
        out.append((name, path))
    problems.raise_any()
    return out


@run_command(PROG)
def run(args) -> int:
    from . import metrics as metrics_mod
    from .dataset import load_beir
    from .embedders import EndpointEmbedder, InProcessEmbedder, api_key_from_env
    from .variants import build_variants, check_against_model, model_problems

    recover_dataset(args)
    # every check that needs no model, each problem reported together, before a model loads or a file is deleted
    problems = Problems()
    for flag in ("batch_size", "top_k", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.add(f"--{flag.replace('_', '-')} must be at least 1")
    problems.attempt(metrics_mod.metric_list, args.metrics)
    dimensions = problems.attempt(_parse_dimensions, args.dimensions)
    variants, baseline = build_variants(
        file=args.variants, instructions=args.instructions, instructions_for=args.instructions_for,
        adapters=args.adapters, tasks=args.tasks, dimensions=dimensions, multivector=args.multivector,
        baseline=args.baseline, task=args.task, adapter=args.adapter, problems=problems,
    )
    dataset = problems.attempt(load_beir, args.dataset, args.split)
    adapter_specs = problems.attempt(_parse_adapter_specs, args.load_adapter) or []
    if args.endpoint and args.load_adapter:
        problems.add("--load-adapter applies to the in-process model; load adapters into the server instead")
    stale = problems.attempt(check_output_folder, args.out, prog=PROG, ours=OUT_FILES, overwrite=args.overwrite)
    if not args.endpoint:
        from nova.model_config import read_model_config

        config = problems.attempt(read_model_config, args.model)
        if config is not None:
            routed = {route.get("adapter") for route in config.config.task_routing.values()}
            for problem in model_problems(variants, adapters=(routed - {None}) | {n for n, _ in adapter_specs},
                                          tasks=config.tasks, dimensions=set(config.config.matryoshka_dims)):
                problems.add(problem)
    problems.raise_any()
    clear_output(stale)
    if not args.endpoint:
        warn_random_weights(PROG, config.random_weights)

    progress = not args.no_progress and sys.stderr.isatty()
    print(f"dataset {dataset.name} ({args.split}): {len(dataset.corpus)} documents, {len(dataset.queries)} queries; "
          f"{len(variants)} variant(s), baseline '{baseline}'")
    if args.endpoint:
        embedder = EndpointEmbedder(args.endpoint, model=args.endpoint_model, api_key=args.api_key or api_key_from_env(),
                                    batch_size=args.batch_size if args.batch_size != 16 else 32, timeout=args.timeout,
                                    show_progress=progress, api_format=args.endpoint_format)
    else:
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model = load_in_process(args.model, args.device, adapter_specs)
        # the loaded model's own adapters: a task adapter the checkpoint does not ship is not there
        check_against_model(variants, adapters=set(model.list_adapters()), tasks=set(model.config.task_routing),
                            dimensions=set(model.config.matryoshka_dims))
        embedder = InProcessEmbedder(model, batch_size=args.batch_size, show_progress=progress,
                                     max_length=args.max_length, name=args.model or "tiny-random")
    evaluate_variants(
        dataset, variants, baseline, embedder, Path(args.out), metrics=args.metrics, top_k=args.top_k,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, ignore_identical_ids=not args.keep_identical_ids,
        per_query=args.per_query, make_plot=not args.no_plot,
    )
    return 0
