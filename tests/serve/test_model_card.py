"""The model card's (README.md's) server commands and requests against a real `nova serve`.

The card's production `nova serve` commands parse and start, with the placeholders a reader fills in (the
model directory, the extra-adapters folder, `$KEY` / `$ADMIN`, 127.0.0.1 and a free port for
0.0.0.0:8080), on the "small" random-weight checkpoint. The card's embedding requests are written for the
quick-start server (`nova serve` with no model: the tiny checkpoint, no key); they run against it with only the
port changed and give `encode()`'s vectors. (tests/docs runs every block of the card as written.)
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import assert_close, decode_embedding, free_port, reference

from nova.tiny import ensure_tiny_checkpoint
from serve import cli

REPO = Path(__file__).resolve().parents[2]
KEY, ADMIN = "card-key", "card-admin"


def card_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def card_commands(program: str) -> list[str]:
    """Every command of the card's bash blocks that starts with `program`: backslash continuations joined, a
    quoted argument (a JSON body) followed over as many lines as it spans."""
    commands = []
    for block in card_blocks("bash"):
        lines = block.replace("\\\n", " ").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip().startswith(program):
                command = lines[i]
                while True:
                    try:
                        shlex.split(command)
                        break
                    except ValueError:  # an open quote: the argument goes on
                        i += 1
                        command += "\n" + lines[i]
                commands.append(command.strip())
            i += 1
    return commands


@pytest.fixture(scope="module")
def card_dirs(tmp_path_factory):
    """./nova-dir (the small checkpoint) and ./adapters-extra (legal; the folder behind /path/to)."""
    small = ensure_tiny_checkpoint(size="small")
    extra = tmp_path_factory.mktemp("adapters-extra")
    shutil.copytree(small / "adapters" / "code", extra / "legal")
    shutil.copytree(small / "adapters" / "text-matching", extra / "legal-v2")
    return small, extra


def fill_in(text: str, small: Path, extra: Path, port: int) -> str:
    return (text.replace("./nova-dir", str(small)).replace("./adapters-extra", str(extra))
            .replace('"$KEY"', KEY).replace("$KEY", KEY)
            .replace('"$ADMIN"', ADMIN).replace("$ADMIN", ADMIN).replace("0.0.0.0", "127.0.0.1")
            .replace("8080", str(port)))


def with_port(text: str, port: int) -> str:
    return text.replace("8080", str(port))


def test_every_serve_command_on_the_card_parses(card_dirs):
    small, extra = card_dirs
    commands = card_commands("nova serve")
    assert len(commands) >= 2, commands
    flags = set()
    for command in commands:
        argv = shlex.split(fill_in(command, small, extra, 8080))[2:]
        parser = cli.argparse.ArgumentParser(prog="nova serve")
        cli.add_arguments(parser)
        settings = cli.settings_from_args(parser.parse_args(argv))
        settings.validate()
        flags |= {a for a in argv if a.startswith("--")}
    assert {"--load-lora", "--max-num-batched-tokens", "--enable-lora", "--lora-root"} <= flags


@pytest.fixture(scope="module")
def card_server(card_dirs, serve_process):
    small, extra = card_dirs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = next(c for c in card_commands("nova serve") if "--load-lora" in c)
    proc = serve_process(small, extra, argv=shlex.split(fill_in(command, small, extra, port))[1:], port=port)
    yield proc.url, port
    proc.stop()


def test_the_cards_production_server_starts(card_server):
    url, _ = card_server
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {m["id"] for m in models["data"]} >= {"nova-embeddings-v1", "legal", "retrieval"}


@pytest.fixture(scope="module")
def quick_start_server(tmp_path_factory, serve_process):
    """`nova serve` with no model, as the card's quick-start line starts it (the port aside)."""
    port = free_port()
    proc = serve_process(None, tmp_path_factory.mktemp("quick-start"), argv=["serve", "--port", str(port)], port=port)
    yield proc.url, port
    proc.stop()


def curl(command: str) -> tuple[str, dict, dict]:
    """(url, headers, JSON body) of one of the card's curl commands."""
    argv = shlex.split(command)
    url, headers, body = argv[1], {}, None
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-H":
            name, _, text = value.partition(":")
            headers[name.strip()] = text.strip()
        elif flag == "-d":
            body = json.loads(value)
    return url, headers, body


def test_the_cards_requests_run_as_written(quick_start_server, tiny_model):
    _, port = quick_start_server
    requests = [curl(with_port(c, port)) for c in card_commands("curl") if "/v1/embeddings" in c]
    assert len(requests) >= 2
    seen_features = set()
    for target, headers, body in requests:
        response = httpx.post(target, headers=headers, json=body, timeout=120)
        assert response.status_code == 200, (target, body, response.text)
        if not target.endswith("/v1/embeddings"):
            continue
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        assert len(data) == len(body["input"])
        for item, entry in zip(body["input"], data, strict=True):
            item = dict(item)
            instructions = item.pop("instructions", body.get("instructions"))
            want = reference(tiny_model, item, instructions=instructions, dimensions=body.get("dimensions"),
                             multivector=body.get("return_multivector", False))
            assert_close(decode_embedding(entry), want)
        seen_features |= {k for k in ("instructions", "dimensions", "return_multivector") if k in body}
        seen_features |= {"item-instructions" for item in body["input"] if "instructions" in item}
        seen_features |= {"image" for item in body["input"] if "image" in item}
        seen_features |= {"code" for item in body["input"] if item.get("task", "").startswith("code")}
    assert seen_features == {"instructions", "dimensions", "return_multivector", "item-instructions", "image", "code"}


def test_the_cards_python_client_runs_as_written(quick_start_server, tiny_model):
    _, port = quick_start_server
    block = next(b for b in card_blocks("python") if "from openai import OpenAI" in b)
    namespace = {}
    exec(compile(with_port(block, port), "README.md", "exec"), namespace)  # as written
    pooled, rows = namespace["pooled"], namespace["rows"]
    assert [len(d.embedding) for d in pooled.data] == [32, 32]
    for text, entry in zip(["hello", "world"], pooled.data, strict=True):
        assert_close(np.asarray(entry.embedding, dtype=np.float32),
                     reference(tiny_model, text, dimensions=32))
    assert_close(rows, reference(tiny_model, {"text": "parse dates", "task": "code.query"},
                                 instructions="Find Python code", multivector=True))
