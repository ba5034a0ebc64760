"""Runs one markdown file's blocks in order, as a reader would: in a working directory that looks like the
repository root, against the servers the reader has running.

What differs from a reader's shell, and why:
- the working directory is a fresh temporary folder holding a symlink to every top-level entry of the
  repository, so commands that read `assets/` or `.venv/` work as from the root while what they write (vectors,
  adapters, reports) lands in the temporary folder, not in the checkout;
- ports: the README's quick-start server (port 8080 in the docs) and each `serve` block's `--port N` run on a
  free port; `localhost:N` / `127.0.0.1:N` in later blocks are rewritten to it, and nothing else is;
- `curl` fails on an HTTP error (`--fail-with-body`: exit 22, the error body still printed), since a reader sees
  an error answer where a script would not;
- `.venv/bin` comes first on PATH (what `pip install` gives a reader), the hub is off (`HF_HUB_OFFLINE=1`) and
  `nova eval`'s embedding cache lives in the temporary folder.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from doc_blocks import REPO, Block

DOCS_PORT = 8080  # the quick-start server's port, as the docs write it
URL_PORT = re.compile(r"\b(localhost|127\.0\.0\.1):(\d{2,5})\b")
SERVE_PORT = re.compile(r"--port[ =](\d+)\b")
BLOCK_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 180
CURL_FAILS_ON_HTTP_ERRORS = 'curl() { command curl --fail-with-body "$@"; }\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def block_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOVA_API_KEY", "NOVA_ADMIN_API_KEY", "OPENAI_API_KEY", "PYTHONPATH")}
    env.update(PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", NOVA_EVAL_CACHE=str(scratch / "eval-cache"))
    return env


def repository_lookalike(folder: Path) -> Path:
    """A folder in which every top-level entry of the repository is a symlink (new files stay in it)."""
    folder.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (folder / entry.name).symlink_to(entry)
    return folder


class BlockFailed(AssertionError):
    pass


@dataclass
class RunningServer:
    """A `nova serve` started from a command line, in a session (process group) of its own so that stopping
    it also stops its model process."""

    command: str
    port: int
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, command: str, port: int, cwd: Path, env: dict[str, str], log: Path) -> RunningServer:
        with log.open("w") as handle:
            process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(command, port, process, log)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BlockFailed(f"`{command}` exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        server.stop()
        raise BlockFailed(f"`{command}` was not healthy after {SERVER_START_TIMEOUT_S}s:\n{server.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class DocSession:
    """The state a reader builds up while following one file: a working directory and running servers."""

    workdir: Path
    scratch: Path
    ports: dict[int, int]  # port as the docs write it -> port it runs on here
    servers: list[RunningServer] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # block -> wall time, printed by the test

    @classmethod
    def open(cls, scratch: Path, quick_start_port: int) -> DocSession:
        return cls(repository_lookalike(scratch / "root"), scratch, {DOCS_PORT: quick_start_port})

    def close(self) -> None:
        for server in self.servers:
            server.stop()

    def with_test_ports(self, block: Block, code: str) -> str:
        def swap(match: re.Match) -> str:
            port = int(match[2])
            if port not in self.ports:
                raise BlockFailed(f"{block.where}: talks to port {port}, which no server of the docs runs on "
                                  f"(started so far: {sorted(self.ports)})")
            return f"{match[1]}:{self.ports[port]}"

        return URL_PORT.sub(swap, code)

    def run(self, block: Block) -> None:
        started = time.monotonic()
        try:
            self._run(block)
        finally:
            self.seconds[block.where] = time.monotonic() - started

    def _run(self, block: Block) -> None:
        if block.kind == "skip":
            return
        if block.kind == "file":
            (self.workdir / block.argument).write_text(block.code)
            return
        if block.kind == "serve":
            self.start_server(block)
            return
        code = block.code
        for old, new in block.replacements:
            code = code.replace(old, new)
        code = self.with_test_ports(block, code)
        if block.language == "bash":
            argv = ["bash", "-euo", "pipefail", "-c", CURL_FAILS_ON_HTTP_ERRORS + code]
        else:
            argv = [str(REPO / ".venv" / "bin" / "python"), "-c", code]
        try:
            done = subprocess.run(argv, cwd=self.workdir, env=block_env(self.scratch), capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired as timeout:
            raise BlockFailed(f"{block.where}: still running after {BLOCK_TIMEOUT_S}s\n{code}") from timeout
        if done.returncode != 0:
            raise BlockFailed(f"{block.where}: exit {done.returncode}\n--- block as run ---\n{code}"
                              f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")

    def start_server(self, block: Block) -> None:
        command = " ".join(block.code.replace("\\\n", " ").split())
        ports = SERVE_PORT.findall(command)
        if len(ports) != 1 or not command.startswith("nova serve"):
            raise BlockFailed(f"{block.where}: a `serve` block is one `nova serve ... --port N` command")
        docs_port = int(ports[0])
        if docs_port in self.ports:
            raise BlockFailed(f"{block.where}: port {docs_port} is already taken by a server the reader runs")
        port = free_port()
        command = SERVE_PORT.sub(f"--port {port}", command)
        log = self.scratch / f"serve-{docs_port}.log"
        self.servers.append(RunningServer.start(command, port, self.workdir, block_env(self.scratch), log))
        self.ports[docs_port] = port
