"""Fixtures for `nova eval` tests: small datasets, a CLI runner, and a real `nova serve` on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nova.evaluation.dataset import write_beir
from nova.training.synthetic import make_task


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("synthetic"), seed=0, train_queries=40, eval_queries=40, distractors=60)


@pytest.fixture
def small_dataset(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
        {"_id": "d2", "title": "", "text": "The Nile is a river in Africa."},
        {"_id": "d3", "title": "Python", "text": "Python is a programming language."},
        {"_id": "d4", "text": "Bread is baked in an oven."},
    ]
    queries = [{"_id": "q1", "text": "capital of France"}, {"_id": "q2", "text": "longest river"},
               {"_id": "q3", "text": "unjudged query"}]
    return write_beir(tmp_path / "small", corpus, queries, {"q1": {"d1": 1}, "q2": {"d2": 1, "d4": 0}})


@pytest.fixture(scope="session")
def nova_server(tiny_dir, tmp_path_factory, serve_process):
    root = tmp_path_factory.mktemp("lora-root")
    server = serve_process(Path(tiny_dir), root)
    server.lora_root = root
    yield server
    server.stop()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
