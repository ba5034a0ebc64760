"""`nova serve` start-up errors, on the real command line: a port that cannot be bound, a model that cannot load, a
bad flag. Each ends the process with a non-zero exit and one line naming the problem (tracebacks only with
`--log-level debug`), leaves no process behind (the model process included), and "listening" is logged only
for a socket that is bound."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from serve.config import Settings
from serve.engine import EngineExited, ProcessEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_BOUND_S = 180  # a bound on a hung process, not a timing: a failing start-up exits long before


@dataclass
class Run:
    returncode: int
    lines: list[str]
    children: set[int] = field(default_factory=set)  # every descendant seen while it ran
    engines: set[int] = field(default_factory=set)  # those running the model (multiprocessing's spawn_main)


def run_serve(*flags: str) -> Run:
    """`nova serve FLAGS` to its end, watching its descendants while it runs."""
    proc = subprocess.Popen([sys.executable, "-m", "nova.cli", "serve", *flags], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    run = Run(returncode=0, lines=lines)
    deadline = time.monotonic() + EXIT_BOUND_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    run.children.add(child.pid)
                    if "spawn_main" in " ".join(child.cmdline()):
                        run.engines.add(child.pid)
            except psutil.Error:  # exited meanwhile
                pass
            time.sleep(0.05)
        assert proc.poll() is not None, f"nova serve {' '.join(flags)} is still running:\n{''.join(lines)}"
    finally:
        if proc.poll() is None:
            for pid in run.children:
                _kill(pid)
            proc.kill()
        proc.wait()
        reader.join(timeout=10)
    run.returncode = proc.returncode
    run.lines = [line.rstrip("\n") for line in lines if line.strip()]
    return run


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def assert_all_gone(pids: set[int]) -> None:
    """Every pid has exited (a zombie waiting for a reaper has exited too); a bound, not a timing."""
    deadline = time.monotonic() + 30
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _running(pid)}
        time.sleep(0.1)
    assert not alive, f"processes left behind: {[psutil.Process(p).cmdline() for p in alive if _running(p)]}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_taken_port_exits_at_once_with_one_line_and_nothing_left_running():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_serve("--port", str(port))
    assert run.returncode == 1, run.lines
    assert run.lines == [f"nova serve: error: cannot listen on 127.0.0.1:{port}: the address is already in use "
                         "(another server?); choose another --port"], run.lines
    assert_all_gone(run.children)


def test_an_unbindable_host_is_one_line():
    run = run_serve("--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: never an address of this machine
    assert run.returncode == 1, run.lines
    assert len(run.lines) == 1 and "--host '192.0.2.1' is not an address of this machine" in run.lines[0], run.lines
    assert_all_gone(run.children)


@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_a_model_that_cannot_load_ends_the_server_and_its_model_process(tmp_path, log_level):
    """An empty directory passes the start-up checks and fails in the model process: the server exits with the
    reason on its last line, the model process is gone, and the traceback shows only with --log-level debug."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    run = run_serve(str(empty), "--port", "0", "--log-level", log_level)
    assert run.returncode == 1, run.lines
    assert run.engines, "the model process never started (the test would prove nothing)"
    assert_all_gone(run.children)
    prefix = "nova serve: error: the model failed to load: "
    assert run.lines[-1].startswith(prefix), run.lines
    traceback = any("Traceback (most recent call last)" in line for line in run.lines)
    assert traceback == (log_level == "debug"), run.lines
    if log_level == "info":
        reason = run.lines[-1].removeprefix(prefix)
        assert [line for line in run.lines if reason in line] == [run.lines[-1]], run.lines  # said once


def test_cuda_graphs_on_a_machine_without_cuda_end_the_server():
    """--cuda-graphs with the default device on a CPU-only machine: refused once the model is placed, never
    silently served without graphs."""
    run = run_serve("--cuda-graphs", "--port", "0")
    assert run.returncode == 1, run.lines
    assert "CUDA graphs need the model on a CUDA device; it is on cpu" in run.lines[-1], run.lines
    assert_all_gone(run.children)


def test_a_model_directory_with_code_needs_trust_remote_code(tiny_dir):
    run = run_serve(str(tiny_dir), "--port", "0")
    assert run.returncode == 2, run.lines
    assert run.lines == [f"nova serve: error: {tiny_dir} carries its own code (*_nova_embeddings_v1.py); to run "
                         "it, pass --trust-remote-code (in Python: trust_remote_code=True)"], run.lines
    assert not run.engines
    assert_all_gone(run.children)


@pytest.mark.parametrize("flags,message", [
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["--port", "70000"], "--port must be 0-65535"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["/no/such/model/dir"], "model /no/such/model/dir: not found"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs the model on CUDA"),
])
def test_a_bad_flag_is_one_line(flags, message):
    run = run_serve(*flags)
    assert run.returncode == 2, run.lines
    assert len(run.lines) == 1 and run.lines[0].startswith("nova serve: error: ") and message in run.lines[0], \
        run.lines
    assert_all_gone(run.children)


def test_listening_names_the_bound_port():
    """--port 0: the logged address is the port the OS gave, and it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "nova.cli", "serve", "--port", "0"], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
            if found:
                break
        assert found, "".join(seen)
        threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()  # keep the pipe drained
        port = int(found.group(1))
        assert port != 0
        deadline = time.monotonic() + EXIT_BOUND_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "".join(seen)
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["random_weights"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_server_stopped_while_its_model_process_starts_leaves_none(tiny_dir):
    """The server stops (start-up failed, or SIGTERM) while a worker thread is spawning the model process: either
    no child is started, or the one started is killed, and the start ends with EngineExited, never with a model
    process loading for a server that is gone."""

    async def stop_during_start(delay: float) -> ProcessEngine:
        engine = ProcessEngine(Settings())
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(delay)
        await engine.stop()
        with pytest.raises(EngineExited):
            await starting
        return engine

    for delay in (0, 0.01, 0.5):  # before, around and after the child is spawned
        engine = asyncio.run(stop_during_start(delay))
        if engine.process is not None:
            engine.process.join(timeout=30)
            assert not engine.process.is_alive()

    async def stop_before_start() -> ProcessEngine:
        engine = ProcessEngine(Settings())
        await engine.stop()
        with pytest.raises(EngineExited):
            await engine.start()
        return engine

    assert asyncio.run(stop_before_start()).process is None
