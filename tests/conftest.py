"""Shared fixtures: the tiny random-weight checkpoint (real tokenizer, image processor, template) and
models loaded from it. Nothing here reaches the network."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from nova.loading import load_model  # noqa: E402
from nova.tiny import ensure_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny_checkpoint()


_SHARED_MODEL: dict = {}  # the session's `tiny_model` and its fingerprint, once some test has asked for it


def _fingerprint(model) -> tuple[dict, object]:
    """(adapter name -> folder, a probe vector per adapter and the base model): what a test that mutated the
    model (adapters loaded or unloaded, weights, dtype) would change."""
    import torch

    adapters = {name: str(info.get("path")) for name, info in model.list_adapters().items()}
    probe = model.encode([{"text": "shared fixture probe", "adapter": name} for name in [*sorted(adapters), "none"]])
    return adapters, torch.stack(probe)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """Shared, read-only: tests that load or unload adapters use `fresh_model` (`shared_model_left_unchanged`
    fails the module that changes it)."""
    model = load_model(tiny_dir)
    _SHARED_MODEL.update(model=model, fingerprint=_fingerprint(model))
    return model


@pytest.fixture(autouse=True, scope="module")
def shared_model_left_unchanged(request):
    """After each module: the shared `tiny_model` still has its adapters and gives the same vectors, else the
    module that changed it fails loudly (the reference vectors of every later test would be wrong)."""
    yield
    if "model" not in _SHARED_MODEL:
        return
    import torch

    adapters, probe = _fingerprint(_SHARED_MODEL["model"])
    want_adapters, want_probe = _SHARED_MODEL["fingerprint"]
    _SHARED_MODEL["fingerprint"] = (adapters, probe)  # the next module is judged from here: one culprit named
    where = f"{request.module.__name__} changed the shared, read-only `tiny_model` fixture (use `fresh_model`)"
    if adapters != want_adapters:
        pytest.fail(f"{where}: its adapters were {want_adapters}, now {adapters}")
    if not torch.allclose(probe, want_probe, rtol=0, atol=1e-5):
        pytest.fail(f"{where}: its vectors moved by up to {float((probe - want_probe).abs().max()):.3g}")


@pytest.fixture
def fresh_model(tiny_dir):
    return load_model(tiny_dir)


def _make_image(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    """A deterministic colour gradient (not flat, so patches differ)."""
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x + y) % 256)
                   for y in range(height) for x in range(width)])
    return image


@pytest.fixture
def make_image():
    """Factory fixture (test modules cannot import from conftest: pytest keys every conftest by one name)."""
    return _make_image


@pytest.fixture
def image():
    return _make_image()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def loopback_port() -> int:
    """A free TCP port on 127.0.0.1 (test modules cannot import `free_port` from conftest)."""
    return free_port()


class ServeProcess:
    """`nova serve` as a separate process on 127.0.0.1 (the real command line, the real HTTP stack)."""

    def __init__(self, model_dir: Path, lora_root: Path, admin_key: str = "admin-test-key", extra=(), *,
                 argv: list[str] | None = None, port: int | None = None):
        """`argv` replaces the whole command line after `nova` (then `port` must be the one it names)."""
        pytest.importorskip("serve.cli")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
        self.log = (lora_root / f"serve-{self.port}.log").open("w")
        if argv is None:
            argv = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), "--trust-remote-code",
                    "--enable-lora", "--lora-root", str(lora_root), "--admin-api-key", admin_key, "--max-wait-ms", "2",
                    *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "nova.cli", *argv], cwd=str(REPO), env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                text = Path(self.log.name).read_text()[-2000:]
                raise RuntimeError(f"nova serve exited with {self.proc.returncode}:\n{text}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("nova serve did not become healthy in time")

    def load_lora(self, name: str, path: Path):
        import httpx

        return httpx.post(self.url + "/v1/internal/lora/load", json={"lora_name": name, "lora_path": str(path)},
                          headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)

    def embed(self, inputs: list, **extra) -> list:
        import httpx
        import numpy as np

        response = httpx.post(self.url + "/v1/embeddings", json={"input": inputs, **extra}, timeout=120)
        assert response.status_code == 200, response.text
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        return [np.asarray(d["embedding"], dtype=np.float32) for d in data]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def serve_process():
    """The `ServeProcess` class: `serve_process(model_dir, lora_root)` starts a real `nova serve`."""
    return ServeProcess


@pytest.fixture
def run_cli(capsys):
    """Run `nova ...` in-process; returns (exit code, stdout, stderr)."""
    from nova.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _write_embed_corpus(folder: Path, n: int = 1000):
    """A JSONL corpus for `nova embed`: n good rows (text of varied length, some with instructions, other
    tasks, images given as relative paths) and five bad rows. -> (path, {id: item as encode() takes it},
    {bad id or position: reason fragment})."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        _make_image(40 + 16 * k, 32 + 8 * k, seed=k).save(folder / f"img{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    good: dict[str, dict] = {}
    lines: list[str] = []
    for i in range(n):
        row: dict = {"id": f"doc-{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(1 + i % 23))}
        if i % 10 == 3:
            row["instructions"] = "Represent the passage for finding related notes."
        if i % 7 == 2:
            row["task"] = "retrieval.passage"
        if i % 97 == 5:
            row["image"] = f"img{i % 3}.png"
        lines.append(json.dumps(row))
        item = {"task": "retrieval.passage", **{k: v for k, v in row.items() if k != "id"}}  # nova embed's default
        if "image" in item:
            item["image"] = str(folder / item["image"])
        good[row["id"]] = item
    bad = {"bad-empty": "'text' is empty", "bad-image": "not a supported image",
           "#no-id": "no 'id'", "#not-json": "not valid JSON", "bad-task": "unknown task"}
    bad_rows = [json.dumps({"id": "bad-empty", "text": ""}), json.dumps({"id": "bad-image", "image": "broken.png"}),
                json.dumps({"text": "a row without an id"}), "{not json", json.dumps({"id": "bad-task", "text": "x",
                                                                                      "task": "nope"})]
    for k, line in enumerate(bad_rows):  # spread the bad rows over the corpus
        lines.insert(min(len(lines), 150 * k + 40), line)
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good, bad


@pytest.fixture(scope="session")
def embed_corpus(tmp_path_factory):
    """(corpus.jsonl, good items by id, bad rows) of 1,000 good rows; shared, read-only."""
    return _write_embed_corpus(tmp_path_factory.mktemp("embed-corpus"))


@pytest.fixture(scope="session")
def embed_reference(embed_corpus, tiny_model):
    """In-process `encode()` of the corpus's good items: {id: pooled vector}."""
    _, good, _ = embed_corpus
    ids = list(good)
    vectors = tiny_model.encode([good[i] for i in ids], return_numpy=True, batch_size=16, show_progress=False)
    return dict(zip(ids, vectors, strict=True))


@pytest.fixture
def check_embed_output():
    """Asserts an output folder holds every good id exactly once, equal to the reference (cos >= 0.9999),
    and every bad row in the errors file with its reason."""
    import json

    import numpy as np

    def check(out_dir: Path, reference: dict, bad: dict) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(out_dir)
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)), "an id was written twice"
        assert set(ids) == set(reference), f"missing {sorted(set(reference) - set(ids))[:5]}"
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        expected = np.stack([reference[i] for i in ids])
        cos = (vectors * expected).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1))
        assert cos.min() >= 0.9999, f"lowest cosine {cos.min()} for {ids[int(cos.argmin())]}"
        errors = [json.loads(line) for line in (out_dir / "_errors.jsonl").read_text().splitlines()]
        assert len(errors) == len(bad)
        for key, fragment in bad.items():
            match = [e for e in errors if (e["id"] == key if not key.startswith("#") else e["id"] is None)
                     and fragment in e["reason"]]
            assert match, f"{key}: no error with {fragment!r} in {errors}"

    return check


@pytest.fixture(scope="session")
def float16_overflow_adapter(tmp_path_factory, tiny_dir):
    """A PEFT folder whose LoRA on the first MLP's down projection pushes that layer's output past float16's
    65504 (about 1e5 in float32): its rows overflow a float16 model for real, while float32 and bfloat16 stay
    finite. Rows routed to other adapters, or to none, are untouched by it."""
    import json

    import torch
    from safetensors.torch import save_file

    config = json.loads((tiny_dir / "config.json").read_text())["text_config"]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, config["intermediate_size"], generator=generator) * 10
    b = torch.full((config["hidden_size"], 4), 3e4)
    folder = tmp_path_factory.mktemp("fp16-overflow") / "loud"
    folder.mkdir()
    module = "base_model.model.model.layers.0.mlp.down_proj"
    save_file({f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                             "target_modules": ["down_proj"]}))
    return folder


@pytest.fixture
def record_preparing_and_launching():
    """record(model) -> a list to which the model's `prepare_item` calls add "P" and its `launch_prepared`
    calls "L", in the order they happen (the real calls, made as they are); unwrapped after the test."""
    wrapped = []

    def record(model) -> list[str]:
        seen: list[str] = []
        prepare, launch = model.processor.prepare_item, model.launch_prepared

        def recording_prepare(*args, **kwargs):
            seen.append("P")
            return prepare(*args, **kwargs)

        def recording_launch(*args, **kwargs):
            seen.append("L")
            return launch(*args, **kwargs)

        model.processor.prepare_item, model.launch_prepared = recording_prepare, recording_launch
        wrapped.append(model)
        return seen

    yield record
    for model in wrapped:
        del model.processor.prepare_item, model.launch_prepared
