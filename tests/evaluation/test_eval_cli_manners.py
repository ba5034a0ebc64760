"""`nova eval` as a new user meets it (the real command on the tiny checkpoint): every variant problem reported in
one run before any model loads; a dataset folder typed after `--instructions ...` kept as the dataset; an
existing --out needs --overwrite; the random-weights warning on the first line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("nova eval: warning")]


def test_every_variant_problem_at_once_before_a_model_loads(small_dataset, run_cli, tiny_dir, tmp_path):
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"variants": [
        {"name": "ok"},
        {"name": "typo", "instuctions": "x"},
        {"name": "bad size", "dimensions": -1},
        {"name": "code-mv", "task": "code", "multivector": True, "dimensions": 32},
        {"name": "adapter", "adapter": "no-such-adapter"},
        {"name": "task", "query_task": "retrieval.questions"},
    ]}))
    # a model folder whose config reads but whose weights are missing: loading it would fail with another error,
    # so the variant problems below are found without loading any model
    unloadable = tmp_path / "config-only"
    unloadable.mkdir()
    shutil.copy(tiny_dir / "config.json", unloadable / "config.json")
    code, stdout, stderr = run_cli("eval", small_dataset, "--out", tmp_path / "o", "--variants", variants,
                                   "--model", unloadable, "--dimensions", "50", "--metrics", "bleu@4")
    assert code == 2 and "Traceback" not in stderr and stdout == ""
    lines = _error_lines(stderr)
    assert lines[0] == "nova eval: error: 8 problems:", stderr
    problems = "\n".join(lines[1:])
    for fragment in ("unknown metric 'bleu@4'",
                     "variant 2 ('typo'): unknown key 'instuctions'",
                     "variant 3 ('bad size'): 'name' is required",
                     "variant 3 ('bad size'): 'dimensions' must be a positive integer, got -1",
                     "variant 4 ('code-mv'): 'dimensions' applies to single vectors",
                     "variant 'adapter': unknown query and passage adapter 'no-such-adapter'; loaded: code, "
                     "retrieval, text-matching",
                     "variant 'task': unknown query task 'retrieval.questions'",
                     "variant 'dim-50': dimensions 50 is not one of the model's matryoshka sizes [16, 32, 64]"):
        assert fragment in problems, problems
    assert all(line.startswith("  - ") for line in lines[1:])
    assert not (tmp_path / "o").exists()


def test_a_dataset_after_list_options_is_kept(small_dataset, run_cli, tmp_path):
    out = tmp_path / "o"
    code, stdout, stderr = run_cli("eval", "--out", out, "--no-cache", "--no-plot", "--instructions",
                                   "Answer geography questions.", small_dataset)
    assert code == 0, stderr
    assert stderr.splitlines()[0].startswith("nova eval: warning: the model has RANDOM WEIGHTS")
    doc = read_json(out / "results.json")
    assert list(doc["results"]) == ["baseline", "instructions-1"]
    assert doc["variants"]["instructions-1"]["query_instructions"] == "Answer geography questions."
    assert doc["dataset"]["num_queries"] == 2

    code, _, stderr = run_cli("eval", "--out", tmp_path / "dims", "--no-cache", "--no-plot", "--dimensions", "16",
                              small_dataset)
    assert code == 0, stderr
    assert list(read_json(tmp_path / "dims" / "results.json")["results"]) == ["baseline", "dim-16"]

    # a dataset path that does not exist is not taken as an instruction silently
    code, _, stderr = run_cli("eval", "--out", tmp_path / "x", "--instructions", "Find it.", tmp_path / "nope")
    assert code == 2
    assert _error_lines(stderr) == ["nova eval: error: DATASET_DIR is missing: after --instructions, argparse reads "
                                    "every word as one more --instructions value, so put DATASET_DIR first (nova "
                                    "eval DATASET_DIR --out DIR --instructions ...)"]


def test_an_existing_out_needs_overwrite(small_dataset, run_cli, tmp_path):
    out = tmp_path / "o"
    assert run_cli("eval", small_dataset, "--out", out, "--no-cache", "--no-plot", "--adapters", "none")[0] == 0
    assert (out / "runs" / "adapter-none.trec").is_file()
    code, _, stderr = run_cli("eval", small_dataset, "--out", out, "--no-cache", "--no-plot")
    assert code == 2
    assert _error_lines(stderr) == [f"nova eval: error: --out {out} already exists and is not empty: add "
                                    "--overwrite to replace it, or choose another folder"]
    code, _, stderr = run_cli("eval", small_dataset, "--out", out, "--no-cache", "--no-plot", "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["baseline.trec"]  # no run file of the earlier run
