"""BEIR loading and the clear, line-numbered errors for bad input (one message, exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nova.evaluation.dataset import load_beir
from nova.evaluation.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]


def test_loads_beir_layout(small_dataset):
    ds = load_beir(small_dataset)
    assert list(ds.corpus) == ["d1", "d2", "d3", "d4"]
    assert ds.corpus["d1"].content() == "Paris Paris is the capital of France."
    assert ds.corpus["d4"].content() == "Bread is baked in an oven."
    assert list(ds.queries) == ["q1", "q2"]  # q3 has no judgement in this split
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}  # score-0 rows do not count as relevant
    assert ds.describe()["num_corpus"] == 4


def test_images_are_resolved_against_the_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "img").mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "img" / "a.png")
    (root / "corpus.jsonl").write_text('{"_id": "d1", "image": "img/a.png"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "red"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    ds = load_beir(root)
    assert ds.corpus["d1"].image == str((root / "img" / "a.png").resolve())
    (root / "corpus.jsonl").write_text('{"_id": "d1", "image": "img/missing.png"}\n')
    with pytest.raises(UserInputError, match=r"corpus.jsonl line 1: image file not found: img/missing.png"):
        load_beir(root)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "corpus.jsonl").unlink(), r"corpus.jsonl: file not found"),
        (lambda r: (r / "queries.jsonl").unlink(), r"queries.jsonl: file not found"),
        (lambda r: (r / "qrels" / "test.tsv").rename(r / "qrels" / "dev.tsv"),
         r"test.tsv: file not found \(available splits: dev\)"),
        (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": "ok"}\n\n{"_id": "d2", "text": oops}\n'),
         r"corpus.jsonl line 3: malformed JSON"),
        (lambda r: (r / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n["not", "an", "object"]\n'),
         r"queries.jsonl line 2: expected a JSON object"),
        (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n'),
         r"corpus.jsonl line 2: duplicate _id 'd1' \(first on line 1\)"),
        (lambda r: (r / "corpus.jsonl").write_text('{"title": "no id"}\n'), r"corpus.jsonl line 1: missing required field '_id'"),
        (lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": 5}\n'),
         r"corpus.jsonl line 1: field 'text' must be a string"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq7\td2\t1\n"),
         r"test.tsv line 3: query id 'q7' is not in queries.jsonl"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tnope\t1\n"),
         r"test.tsv line 2: corpus id 'nope' is not in corpus.jsonl"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("q1\td1\n"), r"test.tsv line 1: expected 3 tab-separated columns"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("q1\td1\thigh\n"), r"test.tsv line 1: score must be a number"),
        (lambda r: (r / "qrels" / "test.tsv").write_text("q1\td1\t0\n"), r"no query has a relevant document"),
    ],
)
def test_bad_input_is_one_clear_error(small_dataset, mutate, message):
    mutate(small_dataset)
    with pytest.raises(UserInputError, match=message):
        load_beir(small_dataset)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(UserInputError, match="dataset folder not found"):
        load_beir(tmp_path / "nowhere")


def test_cli_reports_bad_input_with_exit_code_2(small_dataset, run_cli, tmp_path):
    (small_dataset / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": }\n')
    code, out, err = run_cli("eval", small_dataset, "--out", tmp_path / "out")
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert "corpus.jsonl line 2: malformed JSON" in err


def test_cli_unknown_qrels_id_in_a_real_process(small_dataset, tmp_path):
    """The real command: one line on stderr, exit code 2, no traceback, before any model is loaded."""
    (small_dataset / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td404\t1\n")
    proc = subprocess.run([sys.executable, "-m", "nova.cli", "eval", str(small_dataset), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"nova eval: error: {small_dataset / 'qrels' / 'test.tsv'} line 2: corpus id 'd404' is not in corpus.jsonl"]
