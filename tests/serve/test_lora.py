"""Adapters at run time: admin auth, --lora-root confinement, refused folders change nothing, and
loading/unloading while traffic runs never produces a 500 or a wrong vector; unload drains."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import assert_close, assert_error, decode_embedding, reference

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(tiny_dir / "adapters" / "code", root / "mine")  # "mine" has the code adapter's weights
    shutil.copytree(tiny_dir / "adapters" / "text-matching", root / "other")
    high = root / "rank-too-high"
    shutil.copytree(tiny_dir / "adapters" / "code", high)
    config = json.loads((high / "adapter_config.json").read_text())
    (high / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_module"]}))
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (root / "empty").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_dir / "adapters" / "code", outside / "evil")
    os.symlink(outside / "evil", root / "link-out")
    return root


@pytest.fixture(scope="module")
def server(start_server, lora_root):
    return start_server(enable_lora=True, lora_root=str(lora_root), admin_api_key="admin-key", max_loras=5,
                        max_wait_ms=5)


def admin(server, action, payload=None, headers=ADMIN):
    if action == "list":
        return httpx.get(server.url + "/v1/internal/lora", headers=headers, timeout=30)
    return httpx.post(server.url + f"/v1/internal/lora/{action}", json=payload, headers=headers, timeout=90)


def embed(server, items, **extra):
    return httpx.post(server.url + "/v1/embeddings", json={"input": items, **extra}, timeout=60)


def names(server):
    return [a["lora_name"] for a in admin(server, "list").json()["data"]]


def test_admin_auth(server):
    assert_error(admin(server, "list", headers={}), 401, "invalid_api_key")
    assert_error(admin(server, "list", headers={"Authorization": "Bearer admin-ke"}), 401)
    assert_error(admin(server, "load", {"lora_name": "x", "lora_path": "mine"}, headers={}), 401)
    assert_error(admin(server, "unload", {"lora_name": "code"}, headers={}), 401)
    assert names(server) == ["code", "retrieval", "text-matching"]


def test_admin_routes_disabled_without_enable_lora_or_admin_key(start_server, lora_root):
    plain = start_server(admin_api_key="admin-key", lora_root=str(lora_root))
    assert_error(admin(plain, "list"), 404, "lora_disabled")
    assert_error(admin(plain, "load", {"lora_name": "x", "lora_path": "mine"}), 404, "lora_disabled")
    plain.stop()
    keyless = start_server(enable_lora=True, lora_root=str(lora_root))
    assert_error(admin(keyless, "load", {"lora_name": "x", "lora_path": "mine"}, headers={}), 403, "admin_disabled")
    keyless.stop()


@pytest.mark.parametrize("path,status,code", [
    ("../outside", 403, "lora_path_outside_root"),
    ("/etc", 403, "lora_path_outside_root"),
    ("link-out", 403, "lora_path_outside_root"),
    ("mine/../../", 403, "lora_path_outside_root"),
    ("does-not-exist", 400, "lora_path_not_found"),
    ("", 400, None),
    (None, 400, None),
])
def test_paths_confined_to_lora_root(server, path, status, code):
    assert_error(admin(server, "load", {"lora_name": "x", "lora_path": path}), status, code, "lora_path")
    assert "x" not in names(server)


@pytest.mark.parametrize("folder", ["rank-too-high", "broken", "empty"])
def test_bad_adapter_refused_and_nothing_changes(server, folder):
    before = admin(server, "list").json()
    assert_error(admin(server, "load", {"lora_name": "bad", "lora_path": folder}), 400, "invalid_adapter", "lora_path")
    assert admin(server, "list").json() == before
    assert_error(embed(server, [{"text": "x", "adapter": "bad"}]), 404, "adapter_not_found")
    assert embed(server, ["normal"]).status_code == 200


def test_bad_names_and_duplicates(server):
    for bad in ["", "none", "../x", "a b", 7, "x" * 65]:
        assert_error(admin(server, "load", {"lora_name": bad, "lora_path": "mine"}), 400, None, "lora_name")
    assert_error(admin(server, "load", {"lora_name": "code", "lora_path": "mine"}), 400, "adapter_exists")
    assert_error(admin(server, "unload", {"lora_name": "never-loaded"}), 404, "adapter_not_found")
    assert_error(httpx.post(server.url + "/v1/internal/lora/load", content=b"{bad", headers=ADMIN), 400,
                 "invalid_json")


def test_load_use_unload(server, tiny_model):
    item = {"text": "def add(a, b): return a + b", "task": "code.passage"}
    want = reference(tiny_model, {**item, "adapter": "code"})
    assert_error(embed(server, [{**item, "adapter": "mine"}]), 404, "adapter_not_found", "input[0].adapter")
    assert admin(server, "load", {"lora_name": "mine", "lora_path": "mine"}).status_code == 200
    assert "mine" in names(server)
    response = embed(server, [{**item, "adapter": "mine"}, {**item, "adapter": "none"}])
    assert response.status_code == 200, response.text
    assert_close(decode_embedding(response.json()["data"][0]), want)
    assert_close(decode_embedding(response.json()["data"][1]), reference(tiny_model, {**item, "adapter": "none"}))
    # OpenAI clients select an adapter through `model`
    by_model = embed(server, [item["text"]], model="mine", task="code.passage")
    assert_close(decode_embedding(by_model.json()["data"][0]), want)
    # max_loras=5: 3 task adapters + mine + one more
    assert admin(server, "load", {"lora_name": "other", "lora_path": "other"}).status_code == 200
    assert_error(admin(server, "load", {"lora_name": "third", "lora_path": "mine"}), 400, "invalid_adapter")
    assert admin(server, "unload", {"lora_name": "other"}).status_code == 200
    assert admin(server, "unload", {"lora_name": "mine"}).status_code == 200
    assert_error(embed(server, [{**item, "adapter": "mine"}]), 404, "adapter_not_found")
    assert_error(embed(server, ["x"], model="mine"), 404, "model_not_found")
    rows = httpx.get(server.url + "/metrics").text
    assert 'nova_adapter_rows_total{adapter="mine"}' in rows


def test_load_unload_while_traffic_runs(server, tiny_model):
    texts = [f"traffic item {i} " + "pad " * (i % 9) for i in range(8)]
    want_mine = [reference(tiny_model, {"text": t, "task": "code.query", "adapter": "code"}) for t in texts]
    want_ret = [reference(tiny_model, {"text": t, "task": "retrieval.query"}) for t in texts]
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []
    failures: list[str] = []

    def client(seed: int):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                i = int(rng.integers(len(texts)))
                items = [{"text": texts[i], "task": "code.query", "adapter": "mine"},
                         {"text": texts[i], "task": "retrieval.query"}]
                if rng.random() < 0.5:
                    items = items[::-1]
                response = http.post("/v1/embeddings", json={"input": items})
                if response.status_code == 200:
                    data = response.json()["data"]
                    for item, entry in zip(items, data, strict=True):
                        want = want_mine[i] if item.get("adapter") == "mine" else want_ret[i]
                        got = decode_embedding(entry)
                        if float(np.dot(got, want)) < 0.9999:
                            failures.append(f"wrong vector for {item}")
                    outcomes.append((200, ""))
                else:
                    body = response.json()["error"]
                    outcomes.append((response.status_code, body["code"]))
                    if response.status_code != 404 or body["code"] != "adapter_not_found":
                        failures.append(f"{response.status_code} {body}")
                # a request without the runtime adapter must always succeed
                solo = http.post("/v1/embeddings", json={"input": [{"text": texts[i], "task": "retrieval.query"}]})
                if solo.status_code != 200:
                    failures.append(f"solo {solo.status_code} {solo.text}")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            assert admin(server, "load", {"lora_name": "mine", "lora_path": "mine"}).status_code == 200
            time.sleep(0.25)
            assert admin(server, "unload", {"lora_name": "mine"}).status_code == 200
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    statuses = {status for status, _ in outcomes}
    assert 200 in statuses and 404 in statuses, statuses


@pytest.fixture(scope="module")
def slow_server(start_server, lora_root):
    return start_server(enable_lora=True, lora_root=str(lora_root), admin_api_key="admin-key", max_wait_ms=1200,
                        max_batch_tokens=100_000, max_batch_size=1000)


def test_unload_drains_admitted_rows_and_refuses_new_ones(slow_server, tiny_model):
    assert admin(slow_server, "load", {"lora_name": "mine", "lora_path": "mine"}).status_code == 200
    item = {"text": "admitted before the unload", "task": "code.query", "adapter": "mine"}
    results: dict = {}
    first = threading.Thread(target=lambda: results.update(first=embed(slow_server, [item])))
    first.start()
    deadline = time.monotonic() + 5
    while slow_server.metric("nova_queue_rows") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    unload = threading.Thread(target=lambda: results.update(unload=admin(slow_server, "unload", {"lora_name": "mine"})))
    unload.start()
    time.sleep(0.2)  # the unload is now draining: new rows naming the adapter are refused
    assert_error(embed(slow_server, [item]), 404, "adapter_not_found")
    first.join()
    unload.join()
    assert results["first"].status_code == 200, results["first"].text
    assert_close(decode_embedding(results["first"].json()["data"][0]), reference(tiny_model, {**item, "adapter": "code"}))
    assert results["unload"].status_code == 200
    assert "mine" not in names(slow_server)


# ------------------------------------------------------------------------ routing with and without task adapters


@pytest.fixture(scope="module")
def checkpoint_without_task_adapters(tmp_path_factory, tiny_dir):
    """The tiny checkpoint as a repository checkout without LFS files: adapter configs, no adapter weights."""
    out = tmp_path_factory.mktemp("no-task-weights") / "ckpt"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    assert not list(out.glob("adapters/*/adapter_model.safetensors"))
    return out


def test_plain_requests_route_to_the_base_model_with_a_custom_adapter_loaded(
        serve_process, checkpoint_without_task_adapters, lora_root, tiny_model):
    """Issue 8 item 3: with no task adapter weights and one custom adapter loaded by `--load-lora` (named by
    its weights file, as the model card writes it), plain OpenAI requests answer (base model), not 404."""
    from openai import OpenAI

    weights_file = lora_root / "mine" / "adapter_model.safetensors"
    proc = serve_process(checkpoint_without_task_adapters, lora_root, admin_key="admin-key",
                         extra=["--load-lora", f"custom={weights_file}"])
    try:
        client = OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="ckpt", input=["plain query", "another"])
        assert [d.index for d in got.data] == [0, 1]
        for text, entry in zip(["plain query", "another"], got.data, strict=True):
            assert_close(np.asarray(entry.embedding, dtype=np.float32),
                         reference(tiny_model, {"text": text, "task": "retrieval", "adapter": "none"}))
        # every task routes to the base model; the custom adapter is there for items that name it
        code = proc.embed([{"text": "def f(): pass", "task": "code.passage"},
                           {"text": "def f(): pass", "task": "code.passage", "adapter": "custom"}])
        assert_close(code[0], reference(tiny_model, {"text": "def f(): pass", "task": "code.passage", "adapter": "none"}))
        assert_close(code[1], reference(tiny_model, {"text": "def f(): pass", "task": "code.passage", "adapter": "code"}))
        # a run-time load may also name the weights file of a PEFT folder (same confinement rules)
        loaded = proc.load_lora("other", "other/adapter_model.safetensors")
        assert loaded.status_code == 200, loaded.text
        outside = proc.load_lora("evil", "link-out/adapter_model.safetensors")
        assert_error(outside, 403, "lora_path_outside_root", "lora_path")
        assert proc.embed(["still plain"])[0].shape == (len(got.data[0].embedding),)
    finally:
        proc.stop()


def test_task_adapter_unloaded_at_run_time_is_a_clear_404(start_server, lora_root):
    """A checkpoint that shipped the retrieval adapter, unloaded at run time: its tasks fail loudly (never a
    quietly different vector), naming the adapter, until it is loaded again."""
    server = start_server(enable_lora=True, lora_root=str(lora_root), admin_api_key="admin-key")
    try:
        assert admin(server, "unload", {"lora_name": "retrieval"}).status_code == 200
        err = assert_error(embed(server, ["plain"]), 404, "adapter_not_found", "input[0].task")
        assert "'retrieval'" in err["message"]
        assert embed(server, [{"text": "x", "task": "code.query"}]).status_code == 200
    finally:
        server.stop()


def test_load_lora_naming_a_resident_adapter(server_model_factory, tiny_dir):
    """The model card's `--load-lora retrieval=<checkpoint>/adapters/retrieval/adapter_model.safetensors` names
    the checkpoint's own adapter: nothing to do. Another folder under a resident name is refused at start-up
    (it would quietly change the task's vectors)."""
    from serve.app import create_app
    from serve.config import Settings

    own = tiny_dir / "adapters" / "retrieval" / "adapter_model.safetensors"
    model = server_model_factory()
    before = model.list_adapters()
    create_app(Settings(enable_lora=True, load_lora=[("retrieval", str(own))]), model=model).state.nova \
        ._finish_setup_sync()
    assert model.list_adapters() == before
    other = tiny_dir / "adapters" / "code"
    state = create_app(Settings(enable_lora=True, load_lora=[("retrieval", str(other))]), model=model).state.nova
    with pytest.raises(ValueError, match="'retrieval' is already loaded from"):
        state._finish_setup_sync()
    assert model.list_adapters() == before
