"""`model.rerank()`: the same order and scores as encode() plus scoring by hand (numpy here, not the scoring
module), for text, image and text+image documents, with and without instructions, across adapters; bad input
is a ValueError naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

QUERY = "quarterly revenue chart"
TEXTS = ["revenue grew five percent in the third quarter", "a recipe for apple pie", "headcount by team"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("rerank-images")
    paths = []
    for i in range(2):
        path = folder / f"page{i}.png"
        Image.fromarray(rng.integers(0, 255, (64 + 16 * i, 96, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return [*TEXTS, {"image": paths[0]}, {"text": "the revenue page", "image": paths[1]}, {"text": "staff count per quarter"}]


def by_hand(model, query_item: dict, document_items: list[dict], scoring: str, instructions) -> list[float]:
    """The query encoded alone and the documents together, as `rerank()` says it encodes them: a row's float32
    vector moves by ~1e-7 with the batch it is padded in, which a small maxsim score can show at 1e-5."""
    multivector = scoring == "maxsim"
    encode = lambda items: model.encode(items, instructions=instructions,  # noqa: E731
                                        return_multivector=multivector, return_numpy=True)
    q = encode([query_item])[0].astype(np.float64)
    documents = encode(document_items)
    if multivector:
        return [float((q @ d.astype(np.float64).T).max(axis=1).sum()) for d in documents]
    return [float(q @ d.astype(np.float64)) for d in documents]


def expected_order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def item(document, task: str, adapter: str | None) -> dict:
    out = {"task": task, **({"text": document} if isinstance(document, str) else document)}
    return out if adapter is None else {**out, "adapter": adapter}


@pytest.mark.parametrize("scoring", ["maxsim", "cosine"])
@pytest.mark.parametrize("instructions", [None, "Find the page that answers a finance question"])
@pytest.mark.parametrize("adapter", [None, "none", "code"])
def test_rerank_equals_encode_then_scoring_by_hand(tiny_model, documents, scoring, instructions, adapter):
    got = tiny_model.rerank(QUERY, documents, scoring=scoring, instructions=instructions, adapter=adapter)
    want = by_hand(tiny_model, item(QUERY, "retrieval.query", adapter),
                   [item(d, "retrieval.passage", adapter) for d in documents], scoring, instructions)
    assert [r.index for r in got] == expected_order(want)
    assert [r.score for r in got] == pytest.approx([want[r.index] for r in got], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("task", "query_task", "passage_task"), [
    ("code", "code.query", "code.passage"),
    ("text-matching", "text-matching", "text-matching"),
])
def test_task_picks_the_query_and_passage_sides(tiny_model, documents, task, query_task, passage_task):
    got = tiny_model.rerank(QUERY, documents, task=task)
    want = by_hand(tiny_model, item(QUERY, query_task, None), [item(d, passage_task, None) for d in documents],
                   "maxsim", None)
    assert [r.index for r in got] == expected_order(want)
    assert [r.score for r in got] == pytest.approx([want[r.index] for r in got], rel=1e-5)


def test_a_documents_own_adapter_and_instructions_win(tiny_model):
    docs = [{"text": TEXTS[0], "adapter": "text-matching", "instructions": "Match finance"}, TEXTS[1]]
    got = {r.index: r.score for r in tiny_model.rerank(QUERY, docs, adapter="code", instructions="Find charts")}
    want = by_hand(tiny_model, item(QUERY, "retrieval.query", "code"),
                   [{"task": "retrieval.passage", **docs[0]}, item(TEXTS[1], "retrieval.passage", "code")],
                   "maxsim", "Find charts")
    assert [got[0], got[1]] == pytest.approx(want, rel=1e-5)


def test_an_image_query(tiny_model, documents):
    query = documents[3]
    got = tiny_model.rerank(query, TEXTS)
    want = by_hand(tiny_model, item(query, "retrieval.query", None), [item(t, "retrieval.passage", None) for t in TEXTS],
                   "maxsim", None)
    assert [r.score for r in got] == pytest.approx([want[r.index] for r in got], rel=1e-5)


def test_normalized_maxsim_is_the_mean_over_query_tokens(tiny_model):
    raw = tiny_model.rerank(QUERY, TEXTS)
    normalized = tiny_model.rerank(QUERY, TEXTS, normalize=True)
    n_query_tokens = len(tiny_model.encode([{"task": "retrieval.query", "text": QUERY}], return_multivector=True)[0])
    assert [r.index for r in normalized] == [r.index for r in raw]
    assert [r.score for r in normalized] == pytest.approx([r.score / n_query_tokens for r in raw], rel=1e-6)
    assert all(-1 <= r.score <= 1 for r in normalized)
    cosine = tiny_model.rerank(QUERY, TEXTS, scoring="cosine")
    assert [r.score for r in tiny_model.rerank(QUERY, TEXTS, scoring="cosine", normalize=True)] == [
        r.score for r in cosine]


def test_top_n_keeps_the_best_and_ties_keep_input_order(tiny_model):
    docs = [TEXTS[1], TEXTS[0], TEXTS[1], TEXTS[2]]
    full = tiny_model.rerank(QUERY, docs)
    assert tiny_model.rerank(QUERY, docs, top_n=2) == full[:2]
    assert len(tiny_model.rerank(QUERY, docs, top_n=10)) == 4
    twins = [r.index for r in full if r.index in (0, 2)]
    assert twins == [0, 2]


@pytest.mark.parametrize(("query", "docs", "options", "message"), [
    (QUERY, [], {}, "documents is empty"),
    (QUERY, "one string", {}, "documents must be a list"),
    ("", TEXTS, {}, "query: 'text' is empty"),
    (None, TEXTS, {}, "query: must be a string or an object"),
    (QUERY, ["fine", ""], {}, "item 1: 'text' is empty"),
    (QUERY, ["fine", 7], {}, "item 1: must be a string or an object"),
    (QUERY, [{"task": "code.passage", "text": "x"}], {}, "item 0: 'task' is set"),
    (QUERY, [{"text": "x", "color": "red"}], {}, "item 0: unknown field 'color'; accepted fields: adapter,"),
    (QUERY, TEXTS, {"task": "retrieval.query"}, "give it without its side, 'retrieval'"),
    (QUERY, TEXTS, {"task": "poetry"}, "unknown rerank task 'poetry'; known: code, retrieval, text-matching"),
    (QUERY, TEXTS, {"scoring": "bm25"}, "unknown scoring 'bm25'; known: maxsim, cosine"),
    (QUERY, TEXTS, {"top_n": 0}, "top_n must be a positive integer"),
    (QUERY, TEXTS, {"top_n": True}, "top_n must be a positive integer"),
    (QUERY, TEXTS, {"adapter": "missing"}, "query: unknown adapter 'missing'"),
])
def test_bad_input_is_a_value_error_naming_it(tiny_model, query, docs, options, message):
    with pytest.raises(ValueError) as error:
        tiny_model.rerank(query, docs, **options)
    assert message in str(error.value)


def test_the_project_has_one_maxsim():
    """nova.maxsim (training, evaluation, playground) is the remote code's scoring module, not a copy."""
    import nova.maxsim
    from nova.repo import model_class

    assert nova.maxsim.maxsim_scores is model_class("maxsim_scores")
    assert nova.maxsim.maxsim is model_class("maxsim")
