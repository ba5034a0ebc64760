"""The fenced code blocks of README.md and docs/*.md, each with the `doc-test` marker that says how the docs
tests treat it. The marker is an HTML comment (invisible on GitHub and the Hub) on the line right above the
opening fence:

    <!-- doc-test: run -->                 run it (bash or python) against the quick-start server
    <!-- doc-test: run; a => b -->         run it with `a` replaced by `b` (the prose says why: fewer steps)
    <!-- doc-test: serve -->               a `nova serve --port N` a reader starts in a terminal of its own
    <!-- doc-test: file variants.yaml -->  a reader saves it under that name; later blocks read it
    <!-- doc-test: skip: REASON -->        not run here (a GPU, real weights, a cluster, sample output)

A block without a marker, or with one this module cannot read, is an error: no snippet escapes the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
KINDS = ("run", "serve", "file", "skip")
RUNNABLE_LANGUAGES = ("bash", "python")


class MarkerError(ValueError):
    """A block whose marker is missing or unreadable; the message names the file and line."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    kind: str  # one of KINDS
    argument: str = ""  # the file name of `file`, the reason of `skip`
    replacements: tuple[tuple[str, str], ...] = field(default=())

    @property
    def where(self) -> str:
        return f"{shown(self.path)}:{self.line}"


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def parse_marker(body: str, where: str, language: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """`run; a => b` -> ("run", "", (("a", "b"),)); `skip: REASON` -> ("skip", REASON, ())."""
    if body.startswith("skip"):  # the reason is free text, semicolons included
        reason = body[len("skip"):].lstrip(":").strip()
        if not body.startswith("skip:") or not reason:
            raise MarkerError(f"{where}: write `doc-test: skip: REASON` (why it cannot run here)")
        return "skip", reason, ()
    head, *options = [part.strip() for part in body.split(";")]
    kind, _, argument = head.partition(" ")
    if kind not in KINDS:
        raise MarkerError(f"{where}: unknown doc-test kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "file" and not argument.strip():
        raise MarkerError(f"{where}: `doc-test: file NAME` needs the file name")
    if kind != "file" and argument:
        raise MarkerError(f"{where}: `doc-test: {kind}` takes no argument (got {argument!r})")
    if kind in ("run", "serve") and language not in RUNNABLE_LANGUAGES:
        raise MarkerError(f"{where}: a {language or 'plain'} block cannot be `{kind}` (only bash or python)")
    if kind == "serve" and language != "bash":
        raise MarkerError(f"{where}: a `serve` block is a bash `nova serve` command")
    replacements = []
    for option in options:
        old, arrow, new = option.partition("=>")
        if not arrow or not old.strip() or kind != "run":
            raise MarkerError(f"{where}: options are `OLD => NEW` replacements, on `run` blocks only")
        replacements.append((old.strip(), new.strip()))
    return kind, argument.strip(), tuple(replacements)


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of one markdown file, in order. Raises one MarkerError naming every block whose
    marker is missing or unreadable."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, fence = i, opening["fence"]
        language = (opening["info"].split() or [""])[0]
        where = f"{shown(path)}:{start + 1}"
        end = next((j for j in range(start + 1, len(lines))
                    if lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])), None)
        if end is None:
            raise MarkerError(f"{where}: a fence that is never closed")
        i = end + 1
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[start + 1:end]) + "\n"
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        try:
            if marker is None:
                raise MarkerError(f"{where}: a ```{language} block without a `<!-- doc-test: ... -->` line above "
                                  f"it (run, serve, file NAME or skip: REASON)")
            kind, argument, replacements = parse_marker(marker["body"], where, language)
            missing = [old for old, _ in replacements if old not in code]
            if missing:
                raise MarkerError(f"{where}: the replacement {missing[0]!r} does not occur in the block")
        except MarkerError as error:
            problems.append(str(error))
            continue
        blocks.append(Block(path, start + 1, language, code, kind, argument, replacements))
    if problems:
        raise MarkerError("\n".join(problems))
    return blocks


LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def indented_code_lines(path: Path) -> list[int]:
    """1-based lines that open an indented code block (four spaces after a blank line, outside a list and a
    fence): such a block could hold commands without a marker, so the docs fence every block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, in_fence, paragraph_start = [], None, ""
    for number, line in enumerate(lines, 1):
        opening = FENCE.match(line)
        if in_fence:
            if line.strip().startswith(in_fence) and not line.strip().strip(in_fence[0]):
                in_fence = None
            continue
        if opening:
            in_fence = opening["fence"]
            continue
        previous = lines[number - 2] if number > 1 else ""
        if not previous.strip() and line.strip():
            if line.startswith("    ") and not LIST_ITEM.match(paragraph_start):
                found.append(number)
            elif not line.startswith(" "):
                paragraph_start = line
    return found
