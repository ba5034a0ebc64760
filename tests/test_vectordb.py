"""`nova embed`'s Parquet (a real `nova embed --no-ray` run) into Qdrant's local mode and embedded LanceDB, through
their own clients: a search ranks the corpus as `model.rerank()` does, with the same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qdrant_client")
pytest.importorskip("lancedb")

from qdrant_client import QdrantClient  # noqa: E402

from nova.evaluation.errors import UserInputError  # noqa: E402
from nova.vectordb import point_id, read_embed_output, to_lancedb, to_qdrant  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUERY = "revenue by quarter"
ROWS = [
    {"id": "lease", "text": "Either party may terminate this agreement with 30 days notice."},
    {"id": "revenue", "text": "Quarterly revenue grew 12% on cloud sales."},
    {"id": "revenue-chart", "text": "Revenue chart", "image": str(REPO / "assets" / "chart_revenue.png")},
    {"id": "headcount-chart", "image": str(REPO / "assets" / "chart_headcount.png")},
    {"id": "pie", "text": "A recipe for apple pie with cinnamon."},
    {"id": "code", "text": "def parse(s): return datetime.fromisoformat(s)"},
]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, Path]:
    """The corpus embedded by the `nova embed` command, pooled and multi-vector."""
    folder = tmp_path_factory.mktemp("vectordb")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = {}
    for kind, extra in (("pooled", []), ("multivector", ["--multivector"])):
        out[kind] = folder / kind
        done = subprocess.run([sys.executable, "-m", "nova.cli", "embed", str(corpus), str(out[kind]), "--no-ray",
                               "--no-progress", *extra], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def in_process(model, scoring: str) -> list[tuple[str, float]]:
    """The corpus ranked by model.rerank(): [(row id, score)], best first."""
    documents = [{k: v for k, v in row.items() if k != "id"} for row in ROWS]
    return [(ROWS[r.index]["id"], r.score) for r in model.rerank(QUERY, documents, scoring=scoring)]


def query_vector(model, multivector: bool) -> list:
    return model.encode([{"task": "retrieval.query", "text": QUERY}], return_multivector=multivector)[0].tolist()


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    """The same rows with the same scores, best first (rows with equal scores in either order: the tiny
    random-weight model gives some texts exactly equal MaxSim)."""
    exact = dict(want)
    assert sorted(row_id for row_id, _ in got) == sorted(exact)
    assert [score for _, score in got] == pytest.approx([exact[row_id] for row_id, _ in got], rel=1e-5, abs=1e-6)
    in_order = [exact[row_id] for row_id, _ in got]
    assert all(a >= b - 1e-6 for a, b in zip(in_order, in_order[1:], strict=False)), f"{got} is not ordered as {want}"


@pytest.mark.parametrize(("kind", "scoring"), [("multivector", "maxsim"), ("pooled", "cosine")])
def test_qdrant_search_equals_rerank(tiny_model, embedded, kind, scoring):
    client = QdrantClient(":memory:")
    assert to_qdrant(embedded[kind], client, "corpus") == len(ROWS)
    hits = client.query_points("corpus", query=query_vector(tiny_model, kind == "multivector"), limit=len(ROWS)).points
    assert_same_ranking([(hit.payload["id"], hit.score) for hit in hits], in_process(tiny_model, scoring))


def test_qdrant_on_disk_reload_updates_instead_of_adding(tiny_model, embedded, tmp_path):
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        to_qdrant(embedded["multivector"], client, "corpus")
        to_qdrant(embedded["multivector"], client, "corpus", batch_size=2)
        assert client.count("corpus").count == len(ROWS)
        point = client.retrieve("corpus", [point_id("revenue")], with_vectors=True)[0]
        assert point.payload == {"id": "revenue"}
        assert len(point.vector) == len(tiny_model.encode(
            [{"task": "retrieval.passage", "text": ROWS[1]["text"]}], return_multivector=True)[0])
    finally:
        client.close()


def test_qdrant_refuses_a_collection_of_another_shape(embedded):
    client = QdrantClient(":memory:")
    to_qdrant(embedded["pooled"], client, "corpus")
    with pytest.raises(UserInputError, match="holds pooled 64-d vectors, the folder multi-vector 128-d"):
        to_qdrant(embedded["multivector"], client, "corpus")


@pytest.mark.parametrize(("kind", "scoring"), [("multivector", "maxsim"), ("pooled", "cosine")])
def test_lancedb_search_equals_rerank(tiny_model, embedded, tmp_path, kind, scoring):
    import lancedb

    table = to_lancedb(embedded[kind], lancedb.connect(tmp_path / "lance"), "corpus")
    query = query_vector(tiny_model, kind == "multivector")
    rows = table.search(query, vector_column_name=kind if kind == "multivector" else "embedding").metric(
        "cosine").limit(len(ROWS)).to_list()
    # LanceDB's cosine distance: 1 - cosine, summed over the query's tokens for a multivector column.
    n_terms = len(query) if kind == "multivector" else 1
    assert_same_ranking([(row["id"], n_terms - row["_distance"]) for row in rows], in_process(tiny_model, scoring))


def test_lancedb_create_refuses_an_existing_table_and_overwrite_replaces_it(embedded, tmp_path):
    import lancedb

    db = lancedb.connect(tmp_path / "lance")
    to_lancedb(embedded["pooled"], db, "corpus")
    with pytest.raises(ValueError, match="already exists"):
        to_lancedb(embedded["multivector"], db, "corpus")
    assert to_lancedb(embedded["multivector"], db, "corpus", mode="overwrite").count_rows() == len(ROWS)
    with pytest.raises(UserInputError, match="mode must be 'create' or 'overwrite'"):
        to_lancedb(embedded["pooled"], db, "other", mode="append")


def test_reading_a_folder_no_run_wrote(embedded, tmp_path):
    with pytest.raises(UserInputError, match="not a `nova embed` output folder"):
        read_embed_output(tmp_path)
    output = read_embed_output(embedded["multivector"])
    assert (output.column, output.width, output.multivector, output.table.num_rows) == ("multivector", 128, True,
                                                                                         len(ROWS))
