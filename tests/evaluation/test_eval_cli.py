"""`nova eval` end to end on the tiny checkpoint: outputs, run files, cache sharing, multi-vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nova.evaluation.cache import EmbeddingCache
from nova.evaluation.cli import evaluate_variants
from nova.evaluation.dataset import load_beir
from nova.evaluation.embedders import InProcessEmbedder
from nova.evaluation.metrics import evaluate
from nova.evaluation.runner import read_trec
from nova.evaluation.variants import build_variants

FIVE = ["Find the passage.", "Retrieve documents.", "Match the words.", "Given a query, find its pair.",
        "Represent the query."]


def read_json(path):
    return json.loads(Path(path).read_text())



def test_five_instruction_variants_embed_the_corpus_once(synthetic, run_cli, tmp_path):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    code, stdout, err = run_cli("eval", synthetic["eval"], "--out", out, "--cache-dir", cache, "--instructions", *FIVE,
                                "--dimensions", "32", "--multivector", "--metrics", "nDCG@5", "--top-k", "50")
    assert code == 0, err
    doc = read_json(out / "results.json")
    names = ["baseline"] + [f"instructions-{i}" for i in range(1, 6)] + ["dim-32", "multivector"]
    assert list(doc["results"]) == names
    assert doc["metrics"] == ["nDCG@10", "P@10", "MRR@10", "Recall@100", "nDCG@5"]
    assert doc["baseline"] == "baseline" and doc["deltas"]["baseline"]["nDCG@10"] == 0.0
    assert doc["variants"]["instructions-3"]["query_instructions"] == FIVE[2]
    assert doc["dataset"]["num_queries"] == 40 and doc["dataset"]["split"] == "test"
    assert doc["model"]["kind"] == "in-process" and doc["model"]["random_weights"] is True
    # the corpus is embedded once for the single-vector variants and once for the multi-vector one
    sources = {name: doc["details"][name]["corpus_embeddings"] for name in names}
    assert sources["baseline"] == "embedded" and sources["multivector"] == "embedded"
    assert all(sources[n] == "shared" for n in names[1:7]), sources
    assert doc["settings"]["corpus_embeddings_computed"] == 2
    for name in names:
        delta = doc["deltas"][name]["nDCG@10"]
        assert delta == pytest.approx(doc["results"][name]["nDCG@10"] - doc["results"]["baseline"]["nDCG@10"])
    assert "baseline *" in stdout and ("(+" in stdout or "(-" in stdout)
    assert doc["settings"]["top_k"] == 100

    # run files: standard TREC lines, ranks from 1, scores non-increasing, at most top-k per query
    dataset = load_beir(synthetic["eval"])
    for name in names:
        lines = (out / "runs" / f"{name}.trec").read_text().splitlines()
        per_query: dict[str, list[list[str]]] = {}
        for line in lines:
            fields = line.split()
            assert len(fields) == 6 and fields[1] == "Q0" and fields[5] == name
            per_query.setdefault(fields[0], []).append(fields)
        assert set(per_query) == set(dataset.queries)
        for rows in per_query.values():
            # --top-k 50 is raised to 100 because Recall@100 needs 100 (the corpus has exactly 100 documents)
            assert [int(r[3]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 100
            scores = [float(r[4]) for r in rows]
            assert scores == sorted(scores, reverse=True)
        # the metrics recomputed from the written run file are the reported ones
        recomputed = evaluate(dataset.qrels, read_trec(out / "runs" / f"{name}.trec"), doc["metrics"])
        assert recomputed == pytest.approx(doc["results"][name], abs=1e-12)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nDCG@10" in (out / "results.txt").read_text()

    # a second run reads every corpus from the disk cache and gives the same numbers
    code, _, err = run_cli("eval", synthetic["eval"], "--out", tmp_path / "again", "--cache-dir", cache,
                           "--instructions", *FIVE[:2], "--no-plot")
    assert code == 0, err
    again = read_json(tmp_path / "again" / "results.json")
    assert again["details"]["baseline"]["corpus_embeddings"] == "cache"
    assert again["settings"]["corpus_embeddings_computed"] == 0
    for name in ("baseline", "instructions-1", "instructions-2"):
        assert again["results"][name] == {m: v for m, v in doc["results"][name].items() if m != "nDCG@5"}
    assert not (tmp_path / "again" / "plot.png").exists()


class CountingEmbedder(InProcessEmbedder):
    def __init__(self, model):
        super().__init__(model, batch_size=32, show_progress=False, name="tiny")
        self.calls: list[int] = []

    def embed(self, items, multivector, desc="Embedding"):
        self.calls.append(len(items))
        return super().embed(items, multivector, desc)


def test_passage_side_changes_re_embed_and_cache_keys_follow_the_model(synthetic, tiny_model, tmp_path):
    dataset = load_beir(synthetic["eval"])
    variants, baseline = build_variants(instructions=["A passage."], instructions_for="passage", adapters=["none"])
    embedder = CountingEmbedder(tiny_model)
    doc = evaluate_variants(dataset, variants, baseline, embedder, tmp_path / "o", cache_dir=tmp_path / "c",
                            make_plot=False, log=lambda *_: None)
    n_docs, n_queries = len(dataset.corpus), len(dataset.queries)
    # baseline: corpus + queries; passage instructions: corpus only (queries shared); adapter none: both
    assert embedder.calls == [n_docs, n_queries, n_docs, n_docs, n_queries]
    assert doc["settings"]["corpus_embeddings_computed"] == 3
    cache = EmbeddingCache(tmp_path / "c")
    other_identity = dict(embedder.identity, model="another-model")
    from nova.evaluation.cache import corpus_fingerprint

    key_a = cache.key(embedder.identity, corpus_fingerprint(dataset.path / "corpus.jsonl"), variants[0].passage_settings())
    key_b = cache.key(other_identity, corpus_fingerprint(dataset.path / "corpus.jsonl"), variants[0].passage_settings())
    assert key_a != key_b and (tmp_path / "c" / key_a).is_dir()


def test_dimensions_and_multivector_scores(synthetic, tiny_model, tmp_path):
    dataset = load_beir(synthetic["eval"])
    variants, baseline = build_variants(dimensions=[16, 64], multivector=True)
    embedder = InProcessEmbedder(tiny_model, show_progress=False, name="tiny")
    doc = evaluate_variants(dataset, variants, baseline, embedder, tmp_path / "o", use_cache=False, make_plot=False,
                            log=lambda *_: None)
    # 64 is the tiny model's full size: identical to the baseline
    assert doc["results"]["dim-64"] == doc["results"]["baseline"]
    assert doc["results"]["dim-16"] != doc["results"]["baseline"]
    # MaxSim scores agree with a direct computation on the model's multi-vectors
    run = read_trec(tmp_path / "o" / "runs" / "multivector.trec")
    qid = next(iter(dataset.queries))
    doc_id, score = run[qid][0]
    q = tiny_model.encode([{"task": "retrieval.query", "text": dataset.queries[qid].text}], return_multivector=True)[0]
    d = tiny_model.encode([{"task": "retrieval.passage", "text": dataset.corpus[doc_id].content()}],
                          return_multivector=True)[0]
    assert score == pytest.approx(float((q @ d.T).max(1).values.sum()), abs=1e-5)


def test_variants_file_through_cli(small_dataset, run_cli, tmp_path):
    path = tmp_path / "variants.json"
    path.write_text(json.dumps({"baseline": "plain", "variants": [
        {"name": "plain"}, {"name": "instructed", "query_instructions": "Answer geography questions."},
        {"name": "base-model", "adapter": "none"}, {"name": "mv", "multivector": True}]}))
    code, stdout, err = run_cli("eval", small_dataset, "--variants", path, "--out", tmp_path / "o", "--no-cache",
                                "--per-query")
    assert code == 0, err
    doc = read_json(tmp_path / "o" / "results.json")
    assert list(doc["results"]) == ["plain", "instructed", "base-model", "mv"]
    assert set(doc["per_query"]["plain"]) == {"q1", "q2"}
    assert np.isclose(doc["results"]["plain"]["Recall@100"], 1.0)  # 4 documents: all retrieved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "bleu@4"], "unknown metric 'bleu@4'"),
        (["--adapters", "no-such-adapter"], "unknown query and passage adapter 'no-such-adapter'"),
        (["--dimensions", "4096"], "dimensions 4096 is not one of the model's matryoshka sizes [16, 32, 64]"),
        (["--dimensions", "50"], "dimensions 50 is not one of the model's matryoshka sizes"),
        (["--load-adapter", "x"], "--load-adapter expects NAME=PATH"),
        (["--load-adapter", "x=/no/such/folder"], "folder not found"),
        (["--model", "/no/such/model"], "model /no/such/model: not found"),
        (["--split", "dev"], "dev.tsv: file not found (available splits: test)"),
        (["--variants", "/no/such/file.yaml"], "variants file not found"),
        (["--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_cli_errors(small_dataset, run_cli, tmp_path, args, message):
    code, _, err = run_cli("eval", small_dataset, "--out", tmp_path / "o", "--no-cache", *args)
    assert code == 2, err
    assert "Traceback" not in err and message in err, err
    assert [line for line in err.splitlines() if line.startswith("nova eval")] == [err.strip().splitlines()[-1]]


def test_a_changed_encoding_setting_misses_the_cache(synthetic, tiny_dir, tmp_path):
    """Issue 8 item 10: the corpus cache key holds every setting that changes vectors, so a cached corpus is
    never reused across max_length, chat template, pixel limits or prompt tables."""
    import json

    from nova.loading import load_model

    dataset = load_beir(synthetic["eval"])
    variants, baseline = build_variants()

    def corpus_source(embedder, name):
        doc = evaluate_variants(dataset, variants, baseline, embedder, tmp_path / name, cache_dir=tmp_path / "c",
                                make_plot=False, log=lambda *_: None)
        return doc["details"]["baseline"]["corpus_embeddings"]

    def embedder(model, **kwargs):
        return InProcessEmbedder(model, show_progress=False, name="tiny", **kwargs)

    model = load_model(tiny_dir)
    assert corpus_source(embedder(model), "first") == "embedded"
    assert corpus_source(embedder(model), "same") == "cache"  # nothing changed: a hit
    assert corpus_source(embedder(model, max_length=6), "max-length") == "embedded"
    assert corpus_source(embedder(model, max_length=6), "max-length-again") == "cache"

    size = dict(model.processor.image_processor.size)
    model.processor.image_processor.size = {**size, "longest_edge": size["longest_edge"] // 2}
    assert corpus_source(embedder(model), "pixels") == "embedded"
    model.processor.image_processor.size = size

    model.config.prompt_sets = {**model.config.prompt_sets, "mine": {"retrieval.passage": "Doc: "}}
    assert corpus_source(embedder(model), "prompt-sets") == "embedded"

    template = json.loads((tiny_dir / "chat_template.json").read_text())
    template["chat_template"] = template["chat_template"].replace("Describe the image.", "What is shown?")
    (tmp_path / "template.json").write_text(json.dumps(template))
    templated = load_model(tiny_dir, chat_template=str(tmp_path / "template.json"))
    assert corpus_source(embedder(templated), "template") == "embedded"
