"""`nova train --data TRAIN.jsonl --out ADAPTER_DIR [--model PATH_OR_ID] [--targets llm] [--eval-dataset DIR] ...`"""

from __future__ import annotations

import argparse

from nova.command import add_log_level, run_command

from .trainer import TARGET_PRESETS, TrainConfig, train

PROG = "nova train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="JSONL",
                        help="training triplets: query, positive, optional negatives (required)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="adapter folder to write (PEFT layout) + checkpoints/ + eval/; an existing one that "
                             "holds files needs --resume or --overwrite (required)")
    parser.add_argument("--model", metavar="PATH_OR_ID",
                        help="base model (default: the tiny random-weight checkpoint)")
    parser.add_argument("--name", help="adapter name used in the held-out evaluation (default: the --out folder's name)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--targets", default="llm",
                      help=f"preset ({', '.join(TARGET_PRESETS)}) or a regex over module names; llm = Jina V4's "
                           "targets (default: %(default)s)")
    lora.add_argument("--rank", type=int, help="LoRA rank (default: 16, or the starting adapter's)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank, or the starting adapter's)")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    lora.add_argument("--init-adapter", metavar="NAME_OR_DIR",
                      help="start from an existing adapter (a loaded one such as 'retrieval', or a PEFT folder) "
                           "(default: none, a new adapter)")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    opt.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="linear",
                     help="learning rate after warmup (default: %(default)s)")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default: %(default)s)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0,
                     help="gradient clipping, 0 = off (default: %(default)s)")
    opt.add_argument("--epochs", type=float, default=1.0,
                     help="passes over the data; ignored with --steps (default: %(default)s)")
    opt.add_argument("--steps", type=int, help="optimizer steps, instead of --epochs (default: from --epochs)")
    opt.add_argument("--batch-size", type=int, default=16,
                     help="the contrastive batch, in triplets, all processes together: every positive and hard "
                          "negative of it is a candidate for every query (default: %(default)s)")
    opt.add_argument("--mini-batch-size", type=int, default=16,
                     help="triplets embedded with a graph at once, per process; smaller than a process's share of "
                          "the batch: the exact gradient through GradCache, at this many triplets' activation "
                          "memory, for about one more forward pass (default: %(default)s)")
    opt.add_argument("--grad-accum", type=int, default=1,
                     help="contrastive batches per optimizer step; they do not see each other's candidates "
                          "(default: %(default)s)")
    opt.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default: %(default)s)")
    opt.add_argument("--false-negative-margin", type=float, metavar="M",
                     help="drop from a query's negatives every candidate scoring above its positive by more than M "
                          "(e.g. 0.1): candidates as relevant as the positive, which a larger batch holds more of "
                          "(default: none dropped)")
    opt.add_argument("--max-negatives", type=int,
                     help="use at most this many hard negatives per example (default: all of them)")
    opt.add_argument("--vectors", choices=["single", "multi", "both"], default="single",
                     help="train the pooled vector (cosine), the multi-vectors (MaxSim) or both (sum of losses) "
                          "(default: %(default)s)")
    opt.add_argument("--query-task", default="retrieval.query", help="task of queries (default: %(default)s)")
    opt.add_argument("--passage-task", default="retrieval.passage",
                     help="task of positives and negatives (default: %(default)s)")
    opt.add_argument("--max-length", type=int, default=512,
                     help="truncate items to this many tokens (default: %(default)s)")
    opt.add_argument("--seed", type=int, default=0, help="data order and initialization (default: %(default)s)")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory (large models)")
    opt.add_argument("--precision", choices=["fp32", "bf16"],
                     help="bf16: weights in bfloat16 and bf16 autocast, LoRA parameters kept in fp32 (default: the "
                          "model's dtype, bf16 on CUDA and fp32 on the CPU, without autocast)")
    opt.add_argument("--device", help="cpu, cuda, ... (default: cuda when available; under torchrun each process "
                                      "uses the GPU of its local rank)")
    ck = parser.add_argument_group("checkpoints and the output folder")
    ck.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                    help="save a resumable checkpoint every N steps, 0 = none (default: %(default)s)")
    ck.add_argument("--keep-checkpoints", type=int, default=2,
                    help="how many of the latest checkpoints to keep (default: %(default)s)")
    again = ck.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="continue from the latest checkpoint under --out (or the one given); the run's "
                            "settings must be the checkpoint's (default: start a new run)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace what an earlier `nova train` wrote to --out")
    ev = parser.add_argument_group("held-out evaluation (through nova eval)")
    ev.add_argument("--eval-dataset", metavar="DIR", help="BEIR folder evaluated before/after at the end (default: none)")
    ev.add_argument("--eval-split", default="test", help="qrels split of --eval-dataset (default: %(default)s)")
    ev.add_argument("--eval-instructions", metavar="TEXT",
                    help="query instructions for the held-out evaluation (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.add_argument("--log-every", type=int, default=25,
                        help="steps between log lines without a progress bar (default: %(default)s)")
    add_log_level(parser)


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        data=args.data, out=args.out, model=args.model, name=args.name, targets=args.targets, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, init_adapter=args.init_adapter, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size, grad_accum=args.grad_accum, temperature=args.temperature,
        false_negative_margin=args.false_negative_margin, max_negatives=args.max_negatives,
        query_task=args.query_task, passage_task=args.passage_task, vectors=args.vectors, max_length=args.max_length,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed, eval_dataset=args.eval_dataset, eval_split=args.eval_split,
        eval_instructions=args.eval_instructions, device=args.device, precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
        progress=False if args.no_progress else None, log_every=args.log_every,
    )


@run_command(PROG, interrupted=" (continue with --resume, from the last checkpoint)")
def run(args) -> int:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the model load's own bar
    result = train(config_from_args(args))
    if not result.is_main:  # one process speaks for a torchrun group
        return 0
    print(f"adapter written to {result.out}; load it with model.load_adapter({result.name!r}, {str(result.out)!r}) "
          f"or POST /v1/internal/lora/load")
    return 0
