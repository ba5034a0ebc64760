"""What the job commands (`nova embed`, `nova train`, `nova eval`) do the same way, so that they behave alike:

- `--log-level`: Nova's own log lines at that level; third-party libraries only say warnings and errors, and
  `debug` shows everything, tracebacks included.
- errors: one line `nova X: error: ...` naming the fix, exit code 2 for bad input, 1 for a failure; several
  input problems are reported together, one per line.
- a warning on the first lines when the model has random weights (the bundled tiny checkpoint).
- an output folder that exists and holds files is refused unless `--overwrite` (or `--resume`, where the command
  can continue a run).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import logging
import shutil
import sys
import traceback
from pathlib import Path

from nova.evaluation.errors import UserInputError

LOG_LEVELS = ("debug", "info", "warning", "error")
NOVA_LOGGERS = ("nova", "serve")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="Nova's log lines at this level and above; 'debug' also shows third-party logs "
                             "(Ray, transformers) and the traceback of an error (default: %(default)s)")


def is_debug(args: argparse.Namespace) -> bool:
    return getattr(args, "log_level", "info") == "debug"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged, not the stream at set-up: a command run in a test
    (whose captured stderr closes after it) leaves no handler on a closed file behind."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str) -> None:
    """Nova's loggers at `level`; everything else at WARNING, or at DEBUG along with Nova's when debugging."""
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    for name in NOVA_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    hf_logging.set_verbosity_debug() if level == "debug" else hf_logging.set_verbosity_error()


def run_command(prog: str, interrupted: str = ""):
    """Decorator for a command's `run(args)`: sets up logging, turns errors into one line and an exit code.

    `UserInputError` -> exit 2 with its message (each problem on its own line when there are several); any
    other exception -> exit 1 with its type and first line, and the traceback only with `--log-level debug`;
    Ctrl-C -> exit 130 with `interrupted` (e.g. how to resume)."""

    def wrap(body):
        @functools.wraps(body)
        def run(args: argparse.Namespace) -> int:
            setup_logging(getattr(args, "log_level", "info"))
            try:
                return int(body(args) or 0)
            except UserInputError as exc:
                if is_debug(args):
                    traceback.print_exc()
                print(error_text(prog, exc), file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted{interrupted}", file=sys.stderr)
                return 130
            except Exception as exc:  # noqa: BLE001 - the one place a command's failure becomes its message
                if is_debug(args):
                    traceback.print_exc()
                lines = str(exc).strip().splitlines()
                hint = "" if is_debug(args) else " (run with --log-level debug for the traceback)"
                print(f"{prog}: error: {type(exc).__name__}: {lines[0] if lines else ''}{hint}", file=sys.stderr)
                return 1

        return run

    return wrap


def error_text(prog: str, exc: UserInputError) -> str:
    problems = exc.problems
    if len(problems) == 1:
        return f"{prog}: error: {problems[0]}"
    return f"{prog}: error: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def warn_random_weights(prog: str, random_weights: bool) -> None:
    """The same warning from every command that runs on the tiny checkpoint (its config says
    `nova_random_weights`): anything computed with it is noise."""
    if random_weights:
        print(f"{prog}: warning: the model has RANDOM WEIGHTS (the bundled tiny test checkpoint): its vectors and "
              "scores are meaningless; pass --model for a real one", file=sys.stderr)


def prepare_output_folder(path: str | Path, *, prog: str, ours: tuple[str, ...], overwrite: bool = False,
                          resume: bool = False, resumable: bool = False, flag: str = "--out") -> None:
    """Refuse an output folder that exists and holds files, unless `overwrite` (then the previous output, the
    entries matching the globs `ours`, is deleted; a folder that also holds other files is refused, so a
    mistyped path never loses someone's files) or `resume` (the command continues what is there)."""
    clear_output(check_output_folder(path, prog=prog, ours=ours, overwrite=overwrite, resume=resume,
                                     resumable=resumable, flag=flag))


def check_output_folder(path: str | Path, *, prog: str, ours: tuple[str, ...], overwrite: bool = False,
                        resume: bool = False, resumable: bool = False, flag: str = "--out") -> list[Path]:
    """`prepare_output_folder`'s checks alone -> the entries `--overwrite` will delete (`clear_output`), for a
    command that deletes nothing until every check of its input has passed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path}: exists and is not a folder")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    if not entries or resume:
        return []
    if not overwrite:
        options = "--overwrite to replace it" + (", or --resume to continue its run" if resumable else "")
        raise UserInputError(f"{flag} {path} already exists and is not empty: add {options}, or choose another "
                             "folder")
    foreign = [e.name for e in entries if not any(fnmatch.fnmatchcase(e.name, glob) for glob in ours)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserInputError(f"{flag} {path}: --overwrite replaces only what `{prog}` wrote, and the folder also "
                             f"holds {shown}; choose another folder")
    return entries


def clear_output(entries: list[Path]) -> None:
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_adapter_path(flag: str, path: str | Path) -> None:
    """An adapter path the command line names must exist: "folder not found" is the fix a user needs, not the
    loader's "no adapter_config.json" after a model load."""
    if not Path(path).exists():
        raise UserInputError(f"{flag}: adapter folder not found: {path}")
