"""Every snippet of the README's "Use it from sentence-transformers / MTEB / LangChain" section runs here as
written (only the server's port is substituted; tests/docs runs them too, as subprocesses) and gives Nova's own
vectors: sentence-transformers and LlamaIndex in process, LangChain against a real `nova serve` on loopback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use it from sentence-transformers / MTEB / LangChain"
MARKERS = {"sentence_transformers": "SentenceTransformer(", "mteb": "import mteb", "langchain": "langchain_openai",
           "llamaindex": "llama_index"}
QUERY, PASSAGE = "termination clauses", "Either party may terminate ..."
LEGAL = "Retrieve legal documents"


def readme_snippets() -> dict[str, str]:
    body = (REPO / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    found = {name: [b for b in blocks if marker in b] for name, marker in MARKERS.items()}
    assert len(blocks) == len(MARKERS) and all(len(v) == 1 for v in found.values()), found
    return {name: v[0] for name, v in found.items()}


def run_snippet(name: str, namespace: dict | None = None, **substitutions: str) -> dict:
    code = readme_snippets()[name]
    for old, new in substitutions.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace = dict(namespace or {})
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace


def assert_same(got, want):
    got = torch.as_tensor(np.asarray(got, dtype=np.float32))
    want = torch.stack(list(want)) if isinstance(want, list) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    cos = torch.nn.functional.cosine_similarity(got.reshape(len(got), -1), want.reshape(len(want), -1).float())
    assert float(cos.min()) >= 0.9999, cos


def side(model, texts, task="retrieval.query", **kwargs):
    return model.encode([{"text": t, "task": task} for t in texts], **kwargs)


def test_sentence_transformers_snippet(tiny_model, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(REPO)  # the README's examples run from the repository root (assets/)
    ns = run_snippet("sentence_transformers")
    assert_same(ns["queries"], tiny_model.encode_text([QUERY], task="retrieval", prompt_name="query"))
    assert_same(ns["passages"], tiny_model.encode_text([PASSAGE], task="retrieval", prompt_name="passage"))
    assert torch.allclose(ns["scores"], torch.as_tensor(ns["queries"] @ ns["passages"].T), atol=1e-5)
    assert_same(ns["small"], tiny_model.encode_text([QUERY], task="retrieval", truncate_dim=32))
    image = Image.open(REPO / "assets" / "chart_revenue.png")
    assert_same(ns["pictures"], tiny_model.encode_image([image, image], task="retrieval"))
    assert_same(ns["query_vectors"], side(tiny_model, [QUERY], instructions=LEGAL))
    assert_same(ns["doc_vectors"], side(tiny_model, [PASSAGE], "retrieval.passage"))
    assert_same(ns["mixed"], tiny_model.encode([
        {"text": "parse ISO dates", "task": "code.query", "instructions": "Find Python code"},
        {"text": "a scanned page", "adapter": "none", "task": "retrieval.query"}]))
    assert_same(ns["rows"][0][None], side(tiny_model, [QUERY], return_multivector=True)[0][None])


def test_mteb_snippet(tmp_path, monkeypatch):
    pytest.importorskip("mteb")
    monkeypatch.chdir(tmp_path)  # the snippet writes its BEIR folder into the working directory
    ns = run_snippet("mteb")
    assert 0.0 <= ns["ndcg"] <= 1.0
    assert ns["task"].metadata.prompt == "Given a question, retrieve passages that answer it"


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory, serve_process):
    server = serve_process(Path(tiny_dir), tmp_path_factory.mktemp("lora-root"),
                           extra=("--served-model-name", "nova-embeddings-v1-tiny"))  # the quick-start's name
    yield server
    server.stop()


def test_langchain_snippet_against_nova_serve(served, tiny_model):
    pytest.importorskip("langchain_openai")
    ns = run_snippet("langchain", **{"http://127.0.0.1:8080": served.url})
    assert_same([ns["lc_query_vector"]], side(tiny_model, [QUERY], instructions=LEGAL))
    assert_same(ns["lc_doc_vectors"], side(tiny_model, [PASSAGE], "retrieval.passage"))


def test_llamaindex_snippet(tiny_model):
    pytest.importorskip("llama_index.embeddings.huggingface")
    ns = run_snippet("llamaindex")
    assert_same([ns["li_query_vector"]], side(tiny_model, [QUERY]))
    assert_same(ns["li_doc_vectors"], side(tiny_model, [PASSAGE], "retrieval.passage"))
