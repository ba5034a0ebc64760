"""The `nova` command: one sub-command per job, each owned by the module that does the job."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing `add_arguments(parser)` and `run(args) -> int`, and its one-line help.
SUBCOMMANDS = {
    "serve": ("serve.cli", "run the embedding server"),
    "tiny": ("nova.tiny", "write the tiny random-weight checkpoint"),
    "convert": ("nova.convert", "convert a Jina Embeddings V4 directory into a Nova directory"),
    "train": ("nova.training.cli", "fine-tune a LoRA adapter with PEFT"),
    "eval": ("nova.evaluation.cli", "evaluate variants on a BEIR-layout dataset"),
    "playground": ("app", "start the Gradio playground"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova", description="Nova Embeddings V1")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional extra is not installed
            sub.set_defaults(_missing=f"'nova {name}' needs an optional dependency: {exc}")
            continue
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
