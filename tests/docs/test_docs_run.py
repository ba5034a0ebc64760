"""Every command and snippet of README.md and docs/*.md runs as written (tests/docs/doc_session.py says what
differs from a reader's shell: only ports and a temporary working directory), against ONE `nova serve` started
by the README's own quick-start command; and no fenced block escapes: each carries a `doc-test` marker
(tests/docs/doc_blocks.py) that says whether it runs here or why not."""

from __future__ import annotations

import pytest
from doc_blocks import REPO, MarkerError, doc_files, indented_code_lines, read_blocks
from doc_session import BlockFailed, DocSession, RunningServer, block_env, free_port

QUICK_START = ("bash scripts/setup && HF_HUB_OFFLINE=1 .venv/bin/nova serve",
               "bash scripts/setup --test && .venv/bin/ruff check . && .venv/bin/python -m pytest")


def doc_id(path) -> str:
    return str(path.relative_to(REPO))


def readme_first_commands() -> list[str]:
    first = read_blocks(REPO / "README.md")[0]
    return [line.split("  #", 1)[0].strip() for line in first.code.splitlines()]


def quick_start_serve_command() -> str:
    """The second half of the README's first line: the `nova serve` a reader starts first."""
    return readme_first_commands()[0].split("&&", 1)[1].strip()


@pytest.mark.parametrize("path", doc_files(), ids=doc_id)
def test_every_block_is_marked(path):
    problems = ""
    try:
        read_blocks(path)
    except MarkerError as error:
        problems = str(error)
    assert not problems, problems
    assert not indented_code_lines(path), (
        f"{doc_id(path)}: indented code blocks at lines {indented_code_lines(path)}: fence them and mark them")


def test_readme_opens_with_the_two_quick_start_commands():
    assert readme_first_commands()[:2] == list(QUICK_START)


@pytest.fixture(scope="module")
def quick_start_server(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("quick-start")
    port = free_port()
    server = RunningServer.start(f"{quick_start_serve_command()} --port {port}", port, REPO, block_env(scratch),
                                 scratch / "serve.log")
    yield server
    server.stop()


def runnable_docs() -> list:
    """Docs with a block to run; one whose markers cannot be read is kept, so that it fails here too."""
    def runnable(path) -> bool:
        try:
            return any(block.kind != "skip" for block in read_blocks(path))
        except MarkerError:
            return True

    return [p for p in doc_files() if runnable(p)]


@pytest.mark.parametrize("path", runnable_docs(), ids=doc_id)
def test_doc_runs_as_written(path, quick_start_server, tmp_path):
    session = DocSession.open(tmp_path, quick_start_server.port)
    failure = ""
    try:
        for block in read_blocks(path):
            try:
                session.run(block)
            except BlockFailed as error:
                failure = str(error) + "".join(f"\n--- log of `{s.command}` ---\n{s.log_tail(1500)}"
                                               for s in [quick_start_server, *session.servers])
                break
    finally:
        session.close()
        print("\n".join(f"{where}: {seconds:.1f}s" for where, seconds in session.seconds.items() if seconds > 0.05))
    assert not failure, failure


@pytest.mark.parametrize("path", doc_files(), ids=doc_id)
def test_what_the_tests_replace_is_told_to_the_reader(path):
    """A block run with a replacement (fewer training steps) names the replacement in the prose next to it:
    the marker is an HTML comment, which readers do not see."""
    lines = path.read_text().splitlines()
    try:
        blocks = read_blocks(path)
    except MarkerError:
        pytest.skip("its markers cannot be read: test_every_block_is_marked says why")
    for block in blocks:
        prose = "\n".join(line for line in lines[max(0, block.line - 12):block.line + block.code.count("\n") + 12]
                          if "doc-test:" not in line)
        for _, new in block.replacements:
            assert f"`{new}`" in prose, f"{block.where}: say next to the block that the tests run it with `{new}`"
