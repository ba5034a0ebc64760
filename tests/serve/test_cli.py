"""`nova serve`: every flag documented with its default, bad flag combinations refused, and a real
process: 503 while loading, the random-weights banner, request ids in logs, graceful drain on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import assert_error, free_port

from serve import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova serve")
    cli.add_arguments(parser)
    return parser


def test_every_flag_documents_its_default():
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "default" in action.help, action.option_strings or action.dest
    text = parser.format_help()
    for flag in ["--trust-remote-code", "--is-multi-vector-embeddings", "--enable-lora", "--max-lora-rank",
                 "--max-loras", "--chat-template", "--load-lora", "--host", "--port", "--served-model-name",
                 "--dtype", "--device", "--max-batch-tokens", "--max-batch-size", "--max-wait-ms",
                 "--max-queue-tokens", "--max-client-batch-size", "--payload-limit", "--max-input-tokens",
                 "--auto-truncate", "--max-image-pixels", "--api-key", "--admin-api-key", "--lora-root",
                 "--allow-image-urls", "--image-url-allowlist"]:
        assert flag in text, flag
    assert "2000000" in text and "16384" in text  # TEI-like payload limit and token budget


def test_settings_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("NOVA_API_KEY", "k1, k2")
    args = _parser().parse_args(["some/dir", "--load-lora", "a=/x", "--load-lora", "b=/y", "--enable-lora",
                                 "--api-key", "k0", "--served-model-name", "m", "alias"])
    settings = cli.settings_from_args(args)
    assert settings.model == "some/dir"
    assert settings.load_lora == [("a", "/x"), ("b", "/y")]
    assert settings.api_keys == ["k0", "k1", "k2"]
    assert settings.model_names() == ["m", "alias"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--load-lora", "no-equals-sign"])


def test_vllm_flag_name_is_an_alias_of_max_batch_tokens():
    # the model card's troubleshooting section says "lower --max-num-batched-tokens" (vLLM's name)
    settings = cli.settings_from_args(_parser().parse_args(["--max-num-batched-tokens", "4096"]))
    assert settings.max_batch_tokens == 4096
    assert cli.settings_from_args(_parser().parse_args(["--max-batch-tokens", "2048"])).max_batch_tokens == 2048
    assert "--max-num-batched-tokens" in _parser().format_help()


@pytest.mark.parametrize("flags,message", [
    (["--allow-image-urls"], "allowlist"),
    (["--load-lora", "a=/tmp"], "--enable-lora"),
    (["--lora-root", "/no/such/dir"], "not a directory"),
    (["--replicas", "2"], "--replicas only apply with --ray"),
    (["--ray", "--engine", "process"], "--engine process does not apply with --ray"),
])
def test_bad_flag_combinations_exit_2(flags, message, capsys):
    args = _parser().parse_args(flags)
    assert cli.run(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--bogus"], ["serve", "--max-batch-size", "0"]])
def test_a_bad_flag_is_one_line_naming_the_subcommand(argv, capsys):
    from nova.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nova serve: error: ") and "usage:" not in err, err


def test_every_setting_has_exactly_one_flag_and_round_trips():
    """Settings are defined once (config.py): every field is a flag, and flags -> Settings keeps every value."""
    import dataclasses

    from serve.config import Settings

    parser = _parser()
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(Settings)}
    settings = cli.settings_from_args(parser.parse_args(["--port", "9", "--api-key", "k", "--ray", "--replicas", "2",
                                                         "--cuda-graphs", "--dtype", "float16"]))
    assert (settings.port, settings.api_keys, settings.ray, settings.replicas, settings.cuda_graphs,
            settings.dtype) == (9, ["k"], True, 2, True, "float16")
    assert cli.settings_from_args(parser.parse_args([])) == Settings()



def test_process_banner_health_request_ids_and_sigterm_drain(tiny_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nova.cli", "serve", "--port", str(port), "--max-wait-ms", "1500",
         "--max-batch-tokens", "100000", "--max-batch-size", "1000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                response = httpx.get(url + "/health", timeout=5)
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert_error(response, 503, "model_loading")
                    early = httpx.post(url + "/v1/embeddings", json={"input": "x"})
                    if early.status_code != 200:  # (the model may have become ready in between)
                        assert_error(early, 503, "model_loading")
                        assert early.headers["retry-after"]
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        assert statuses and statuses[-1] == 200, statuses
        assert set(statuses) <= {200, 503}
        assert httpx.get(url + "/health").json()["random_weights"] is True

        result: dict = {}

        def slow_request():  # waits ~1.5 s in the queue: in flight when SIGTERM arrives
            result["r"] = httpx.post(url + "/v1/embeddings", json={"input": ["drain me"]},
                                     headers={"X-Request-Id": "drain-test-42"}, timeout=30)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=30)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].headers["x-request-id"] == "drain-test-42"
        # uvicorn re-raises the captured SIGTERM once drained: a clean exit "by SIGTERM" (what systemd expects)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    log = "".join(lines)
    assert "RANDOM WEIGHTS" in log
    assert "[drain-test-42] serve.access" in log
    assert "Traceback" not in log
