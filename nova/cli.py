"""The `nova` command: one sub-command per job, each owned by the module that does the job.

Only the chosen sub-command's module is imported, so `nova convert` does not pay for Gradio, and a missing
optional extra only affects the sub-command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module exposing `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS = {
    "serve": ("serve.cli", "run the embedding server"),
    "tiny": ("nova.tiny", "write the tiny random-weight checkpoint"),
    "convert": ("nova.convert", "convert a Jina Embeddings V4 directory into a Nova directory"),
    "train": ("nova.training.cli", "fine-tune a LoRA adapter with PEFT"),
    "eval": ("nova.evaluation.cli", "evaluate variants on a BEIR-layout dataset"),
    "embed": ("nova.embed.cli", "embed a corpus into Parquet vectors (Ray Data, or one process)"),
    "playground": ("app", "start the Gradio playground"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova", description="Nova Embeddings V1")
    # Unrecognized arguments are reported by this parser, not the sub-command's: one line naming the
    # sub-command, not argparse's usage block.
    prog = f"nova {command}" if command in SUBCOMMANDS else "nova"
    parser.error = lambda message: parser.exit(2, f"{prog}: error: {message} (see {prog} --help)\n")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                sub.set_defaults(_missing=f"'nova {name}' needs an optional dependency that is not installed: {exc}")
                continue
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
