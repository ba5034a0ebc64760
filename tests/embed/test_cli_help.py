"""The job commands' `--help` (embed, train, eval): every option that takes a value says its default, a value the
parser holds is shown by argparse itself (%(default)s, so the text cannot drift from the code), and each command
has `--log-level`, and `--overwrite` for its output."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from nova.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _subcommand(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", ["embed", "train", "eval"])
def test_every_default_is_in_help(command):
    parser = _subcommand(command)
    missing, not_from_parser = [], []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required or action.help == argparse.SUPPRESS:
            continue  # positionals, flags (store_true), required options and --help
        if "default" not in (action.help or ""):
            missing.append(action.option_strings[0])
        elif action.default not in (None, [], False) and "%(default)s" not in action.help:
            not_from_parser.append(action.option_strings[0])
    assert not missing, f"nova {command}: no default in the help of {missing}"
    assert not not_from_parser, f"nova {command}: defaults written by hand for {not_from_parser}"
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {"--log-level", "--overwrite"} <= flags


def test_help_shows_the_values():
    done = subprocess.run([sys.executable, "-m", "nova.cli", "train", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for shown in ("learning rate (default: 0.0002)", "InfoNCE temperature (default: 0.05)",
                  "(default: linear)", "[--log-level {debug,info,warning,error}]"):
        assert shown in text
