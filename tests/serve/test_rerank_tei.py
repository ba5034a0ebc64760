"""`/v1/rerank` and TEI's routes on a real `nova serve` (a subprocess on 127.0.0.1), called by the real clients
(cohere, huggingface_hub's InferenceClient, LlamaIndex's TextEmbeddingsInference) and by plain HTTP: results
equal `model.rerank()` / `encode()` in process; bad input is refused in each route family's error shape, never
with a 500."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "assets" / "chart_revenue.png"
CHART_URL = "data:image/png;base64," + base64.b64encode(CHART.read_bytes()).decode()
QUERY = "revenue by quarter"
TEXTS = ["Quarterly revenue grew 12% on cloud sales.", "A recipe for apple pie.", "Headcount by team",
         "Either party may terminate this agreement with 30 days notice."]
DOCUMENTS = [*TEXTS, {"image": CHART_URL}, {"text": "the revenue chart", "image": CHART_URL}]
MAX_DOCUMENTS = 8
PAYLOAD_LIMIT = 400_000


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory, serve_process):
    proc = serve_process(Path(tiny_dir), tmp_path_factory.mktemp("lora-root"),
                         extra=("--max-rerank-documents", str(MAX_DOCUMENTS), "--payload-limit", str(PAYLOAD_LIMIT),
                                "--served-model-name", "nova-embeddings-v1-tiny"))
    yield proc
    proc.stop()


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def assert_same_ranking(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Same documents, same scores (relative 1e-5), best first; documents with equal scores in either order (the
    tiny random-weight model gives some texts exactly equal MaxSim)."""
    exact = dict(want)
    assert sorted(i for i, _ in got) == sorted(exact)
    assert [s for _, s in got] == pytest.approx([exact[i] for i, _ in got], rel=1e-5, abs=1e-6)
    in_order = [exact[i] for i, _ in got]
    assert all(a >= b - 1e-6 for a, b in zip(in_order, in_order[1:], strict=False)), (got, want)


def in_process(model, documents=DOCUMENTS, **options) -> list[tuple[int, float]]:
    return [(r.index, r.score) for r in model.rerank(QUERY, documents, **options)]


# ---------------------------------------------------------------------- /v1/rerank


@pytest.mark.parametrize("scoring", ["maxsim", "cosine"])
@pytest.mark.parametrize(("instructions", "adapter"), [(None, None), ("Find financial charts", "code"),
                                                      (None, "none")])
def test_v1_rerank_equals_model_rerank(server, tiny_model, scoring, instructions, adapter):
    body = {"query": QUERY, "documents": DOCUMENTS, "scoring": scoring}
    body.update({k: v for k, v in (("instructions", instructions), ("adapter", adapter)) if v is not None})
    response = post(server, "/v1/rerank", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] and answer["usage"]["total_tokens"] > 0
    assert [r["document"] for r in answer["results"]] == [
        {"text": d} if isinstance(d, str) else d for d in (DOCUMENTS[r["index"]] for r in answer["results"])]
    assert_same_ranking([(r["index"], r["relevance_score"]) for r in answer["results"]],
                        in_process(tiny_model, scoring=scoring, instructions=instructions, adapter=adapter))


def test_v1_rerank_task_top_n_normalize_and_no_documents_echoed(server, tiny_model):
    body = {"query": {"text": QUERY}, "documents": TEXTS, "task": "code", "top_n": 2, "normalize": True,
            "return_documents": False}
    answer = post(server, "/v1/rerank", body).json()
    assert len(answer["results"]) == 2 and all("document" not in r for r in answer["results"])
    full = in_process(tiny_model, TEXTS, task="code", normalize=True)
    assert_same_ranking([(r["index"], r["relevance_score"]) for r in answer["results"]],
                        [pair for pair in full if pair[0] in {r["index"] for r in answer["results"]}])
    assert answer["results"][0]["relevance_score"] == pytest.approx(full[0][1], rel=1e-5)


def test_cohere_client_rerank(server, tiny_model):
    cohere = pytest.importorskip("cohere")
    client = cohere.Client(api_key="unused", base_url=server.url)
    response = client.rerank(model="nova-embeddings-v1-tiny", query=QUERY, documents=TEXTS, top_n=3,
                             return_documents=True)
    assert [r.document.text for r in response.results] == [TEXTS[r.index] for r in response.results]
    want = in_process(tiny_model, TEXTS)
    assert_same_ranking([(r.index, r.relevance_score) for r in response.results],
                        [pair for pair in want if pair[0] in {r.index for r in response.results}])
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url).rerank(model="nova-embeddings-v1-tiny", query=QUERY,
                                                                      documents=TEXTS)
    assert_same_ranking([(r.index, r.relevance_score) for r in v2.results], want)


# ---------------------------------------------------------------------- TEI


def test_tei_rerank_scores_are_maxsim_normalized_or_raw(server, tiny_model):
    normalized = post(server, "/rerank", {"query": QUERY, "texts": TEXTS, "return_text": True}).json()
    assert [r["text"] for r in normalized] == [TEXTS[r["index"]] for r in normalized]
    assert_same_ranking([(r["index"], r["score"]) for r in normalized], in_process(tiny_model, TEXTS, normalize=True))
    raw = post(server, "/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    assert all("text" not in r for r in raw)
    assert_same_ranking([(r["index"], r["score"]) for r in raw], in_process(tiny_model, TEXTS))


def encoded(model, texts, task="retrieval", **options) -> np.ndarray:
    return np.stack([v.numpy() for v in model.encode([{"task": task, "text": t} for t in texts], **options)])


def test_huggingface_inference_client_feature_extraction(server, tiny_model, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # The hub library refuses every request in offline mode, to 127.0.0.1 too; this client talks to loopback only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=server.url)
    np.testing.assert_allclose(client.feature_extraction(TEXTS[0]), encoded(tiny_model, TEXTS[:1]), atol=1e-5)
    np.testing.assert_allclose(client.feature_extraction(TEXTS[1], prompt_name="passage"),
                               encoded(tiny_model, TEXTS[1:2], "retrieval.passage"), atol=1e-5)


def test_llamaindex_text_embeddings_inference(server, tiny_model):
    tei = pytest.importorskip("llama_index.embeddings.text_embeddings_inference")
    embedder = tei.TextEmbeddingsInference(model_name="nova-embeddings-v1-tiny", base_url=server.url)
    np.testing.assert_allclose(embedder.get_text_embedding_batch(TEXTS), encoded(tiny_model, TEXTS), atol=1e-5)
    np.testing.assert_allclose(embedder.get_query_embedding(QUERY), encoded(tiny_model, [QUERY])[0], atol=1e-5)


def test_embed_dimensions_embed_all_tokenize_and_info(server, tiny_model):
    small = post(server, "/embed", {"inputs": TEXTS[:2], "dimensions": 32, "prompt_name": "retrieval.passage"}).json()
    np.testing.assert_allclose(small, encoded(tiny_model, TEXTS[:2], "retrieval.passage", dimensions=32), atol=1e-5)
    rows = post(server, "/embed_all", {"inputs": "hello world"}).json()
    want = tiny_model.encode([{"task": "retrieval", "text": "hello world"}], return_multivector=True)[0].numpy()
    np.testing.assert_allclose(np.asarray(rows[0]), want, atol=1e-5)
    tokens = post(server, "/tokenize", {"inputs": ["héllo 🙂 world"]}).json()[0]
    prepared = tiny_model.processor.prepare_item({"task": "retrieval", "text": "héllo 🙂 world"})
    assert [t["id"] for t in tokens] == prepared.input_ids
    rendered = "Query: héllo 🙂 world"
    assert all(rendered[t["start"]:t["stop"]] == t["text"] for t in tokens if t["start"] is not None)
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert info["max_client_batch_size"] == 32 and info["max_rerank_documents"] == MAX_DOCUMENTS
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}


# ---------------------------------------------------------------------- refusals

BIG = "x" * (PAYLOAD_LIMIT + 10)
REMOTE_IMAGE = "http://127.0.0.1:9/page.png"  # never fetched: the server does not allow image URLs


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"query": QUERY, "documents": []}, 400, "documents", "at least one document"),
    ({"query": QUERY}, 400, "documents", "must be a list"),
    ({"query": QUERY, "documents": ["a"] * (MAX_DOCUMENTS + 1)}, 413, "documents", "--max-rerank-documents"),
    ({"query": "", "documents": TEXTS}, 400, "query", "query: text is empty"),
    ({"documents": TEXTS}, 400, "query", "'query' is required"),
    ({"query": QUERY, "documents": ["a", ""]}, 400, "documents[1]", "item 1: text is empty"),
    ({"query": QUERY, "documents": TEXTS, "model": "no-such-model"}, 404, "model", "does not exist"),
    ({"query": QUERY, "documents": ["a", {"image": REMOTE_IMAGE}]}, 400, "documents[1].image", "item 1:"),
    ({"query": {"image": REMOTE_IMAGE}, "documents": TEXTS}, 400, "query.image", "query:"),
    ({"query": QUERY, "documents": ["a", {"text": "b", "adapter": "gone"}]}, 404, "documents[1].adapter", "gone"),
    ({"query": QUERY, "documents": [{"text": "a", "task": "code.passage"}]}, 400, "documents[0].task", "'task'"),
    ({"query": QUERY, "documents": TEXTS, "task": "retrieval.query"}, 400, "task", "without its side"),
    ({"query": QUERY, "documents": TEXTS, "scoring": "bm25"}, 400, "scoring", "'maxsim' or 'cosine'"),
    ({"query": QUERY, "documents": TEXTS, "top_n": 0}, 400, "top_n", "positive integer"),
    ({"query": QUERY, "documents": TEXTS, "rank_fields": ["title"]}, 400, "rank_fields", "rank_fields"),
    ({"query": BIG, "documents": TEXTS}, 413, None, "--payload-limit"),
])
def test_v1_rerank_refusals_are_openai_errors(server, body, status, param, message):
    response = post(server, "/v1/rerank", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/embed", {"inputs": []}, 422, "non-empty list"),
    ("/embed", {"inputs": ["a"] * 33}, 413, "maximum allowed batch size 32"),
    ("/embed", {"inputs": "a", "normalize": False}, 422, "always L2-normalized"),
    ("/embed", {"inputs": "a", "prompt_name": "poem"}, 422, "unknown prompt_name 'poem'"),
    ("/embed", {"inputs": "a", "truncation_direction": "Left"}, 422, "only 'Right'"),
    ("/embed", {"inputs": "a", "dimensions": 7}, 422, "dimensions"),
    ("/embed", {"inputs": [[1, 2, 3]]}, 422, "token ids are not supported"),
    ("/", {"inputs": ""}, 422, "text is empty"),
    ("/", {"inputs": "a", "colour": "red"}, 422, "colour"),
    ("/embed_all", {"inputs": "a", "dimensions": 32}, 422, "dimensions"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": False}, 422, "add_special_tokens"),
    ("/rerank", {"query": QUERY, "texts": []}, 422, "at least one document"),
    ("/rerank", {"query": QUERY, "texts": ["a"] * (MAX_DOCUMENTS + 1)}, 413, "--max-rerank-documents"),
    ("/rerank", {"query": QUERY, "texts": [{"image": CHART_URL}]}, 422, "list of strings"),
    ("/rerank", {"query": "", "texts": TEXTS}, 422, "query: text is empty"),
    ("/embed", {"inputs": BIG}, 413, "--payload-limit"),
    ("/embed", "not an object", 422, "JSON object"),
])
def test_tei_refusals_are_tei_errors(server, path, body, status, message):
    before = rejected(server)
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "Validation", error
    assert message in error["error"], error
    assert rejected(server) == before + 1  # counted in the metrics, once, as /v1/embeddings' refusals are


def rejected(server) -> float:
    """The server's refusals so far (nova_rejected_requests_total, every reason)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nova_rejected_requests_total{"))


def test_a_bad_request_leaves_the_server_serving(server, tiny_model):
    """After every refusal above, a good request still gets the in-process answer."""
    assert post(server, "/rerank", {"query": QUERY, "texts": ["ok", ""]}).status_code == 422
    answer = post(server, "/v1/rerank", {"query": QUERY, "documents": TEXTS}).json()
    assert_same_ranking([(r["index"], r["relevance_score"]) for r in answer["results"]], in_process(tiny_model, TEXTS))


ODD_VALUES = [None, 0, -1, 1.5, True, "", "s", [], [1], [[]], [None], {}, {"text": 1}, [{"text": 1}], [{"image": 1}],
              ["a", {"image": ""}], "x" * 5000]
BODIES = {
    "/v1/rerank": {"query": QUERY, "documents": TEXTS[:2]},
    "/rerank": {"query": QUERY, "texts": TEXTS[:2]},
    "/embed": {"inputs": TEXTS[:2]},
    "/": {"inputs": TEXTS[:2]},
    "/embed_all": {"inputs": TEXTS[:2]},
    "/tokenize": {"inputs": TEXTS[:2]},
}


@pytest.mark.parametrize("path", list(BODIES))
def test_odd_values_in_every_field_never_answer_500(server, path):
    """Each documented field (and one unknown) set to values of every JSON type: an answer or a refusal in the
    route family's shape, never a 500."""
    from serve.rerank import RERANK_FIELDS
    from serve.tei import EMBED_ALL_FIELDS, EMBED_FIELDS, TOKENIZE_FIELDS
    from serve.tei import RERANK_FIELDS as TEI_RERANK_FIELDS

    fields = {"/v1/rerank": RERANK_FIELDS, "/rerank": TEI_RERANK_FIELDS, "/embed": EMBED_FIELDS, "/": EMBED_FIELDS,
              "/embed_all": EMBED_ALL_FIELDS, "/tokenize": TOKENIZE_FIELDS}[path]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for field in [*fields, "bogus"]:
            for value in ODD_VALUES:
                response = client.post(path, json={**BODIES[path], field: value})
                assert response.status_code < 500, (path, field, value, response.text[:300])
                if response.status_code >= 400:
                    body = response.json()
                    shape = {"error"} if path == "/v1/rerank" else {"error", "error_type"}
                    assert set(body) == shape, (path, field, value, body)
