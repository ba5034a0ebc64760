"""`nova eval` gives the same numbers in-process and through a real `nova serve` on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nova.evaluation.dataset import load_beir
from nova.evaluation.embedders import EndpointEmbedder, InProcessEmbedder
from nova.evaluation.runner import read_trec

VARIANTS = {"baseline": "plain", "variants": [
    {"name": "plain"},
    {"name": "instructed", "query_instructions": "Find the passage with the paired words."},
    {"name": "both-sides", "instructions": "Synthetic word pairs."},
    {"name": "base-model", "adapter": "none"},
    {"name": "code-task", "task": "code"},
    {"name": "dim-32", "dimensions": 32},
    {"name": "maxsim", "multivector": True},
]}


def read_json(path):
    return json.loads(Path(path).read_text())



def test_same_numbers_in_process_and_through_the_server(synthetic, nova_server, run_cli, tmp_path):
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps(VARIANTS))
    code, _, err = run_cli("eval", synthetic["eval"], "--variants", variants, "--out", tmp_path / "local", "--no-cache")
    assert code == 0, err
    code, _, err = run_cli("eval", synthetic["eval"], "--variants", variants, "--out", tmp_path / "remote", "--no-cache",
                           "--endpoint", nova_server.url, "--batch-size", "7")
    assert code == 0, err
    local = read_json(tmp_path / "local" / "results.json")
    remote = read_json(tmp_path / "remote" / "results.json")
    assert remote["model"]["kind"] == "endpoint" and remote["model"]["url"] == nova_server.url + "/v1/embeddings"
    assert list(local["results"]) == list(remote["results"])
    for name in local["results"]:
        assert remote["results"][name] == pytest.approx(local["results"][name], abs=1e-9), name
        # same rankings, document for document (scores equal to float tolerance)
        a = read_trec(tmp_path / "local" / "runs" / f"{name}.trec")
        b = read_trec(tmp_path / "remote" / "runs" / f"{name}.trec")
        for qid in a:
            assert [d for d, _ in a[qid][:10]] == [d for d, _ in b[qid][:10]], (name, qid)
            assert np.allclose([s for _, s in a[qid]], [s for _, s in b[qid]], atol=1e-5)


def test_endpoint_vectors_match_in_process(synthetic, nova_server, tiny_model):
    dataset = load_beir(synthetic["eval"])
    items = [{"task": "retrieval.passage", "text": d.content()} for d in list(dataset.corpus.values())[:10]]
    items.append({"task": "retrieval.query", "text": "river stone", "instructions": "Find it.", "adapter": "none"})
    remote = EndpointEmbedder(nova_server.url, batch_size=4, show_progress=False)
    local = InProcessEmbedder(tiny_model, show_progress=False)
    for multivector in (False, True):
        got = remote.embed(items, multivector)
        want = local.embed(items, multivector)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert np.allclose(g, w, atol=1e-5)
    remote.close()


def test_endpoint_errors_are_one_clear_message(synthetic, nova_server, run_cli, tmp_path):
    code, _, err = run_cli("eval", synthetic["eval"], "--out", tmp_path / "o", "--no-cache", "--endpoint",
                           nova_server.url, "--adapters", "not-loaded")
    assert code == 2 and "Traceback" not in err
    assert "answered 404" in err or "not-loaded" in err
    code, _, err = run_cli("eval", synthetic["eval"], "--out", tmp_path / "o", "--no-cache", "--endpoint",
                           "http://127.0.0.1:9", "--timeout", "2")
    assert code == 2 and "Traceback" not in err and "cannot reach" in err


def test_image_corpus_same_numbers_in_process_and_through_the_server(tmp_path, nova_server, run_cli):
    from PIL import Image

    from nova.evaluation.dataset import write_beir

    root = tmp_path / "images"
    (root / "img").mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    corpus, queries, qrels = [], [], {}
    for i, colour in enumerate(colours):
        Image.new("RGB", (56 + 14 * i, 56), colour).save(root / "img" / f"{colour}.png")
        corpus.append({"_id": f"img-{colour}", "image": f"img/{colour}.png", "title": "" if i % 2 else f"A {colour} square"})
        corpus.append({"_id": f"txt-{colour}", "text": f"Something {colour}."})
        queries.append({"_id": f"q-{colour}", "text": f"{colour} picture"})
        qrels[f"q-{colour}"] = {f"img-{colour}": 1}
    write_beir(root, corpus, queries, qrels)
    args = ["--no-cache", "--multivector", "--instructions", "Find the image."]
    code, _, err = run_cli("eval", root, "--out", tmp_path / "local", *args)
    assert code == 0, err
    code, _, err = run_cli("eval", root, "--out", tmp_path / "remote", "--endpoint", nova_server.url, *args)
    assert code == 0, err
    local = read_json(tmp_path / "local" / "results.json")
    remote = read_json(tmp_path / "remote" / "results.json")
    for name in local["results"]:
        assert remote["results"][name] == pytest.approx(local["results"][name], abs=1e-9), name
