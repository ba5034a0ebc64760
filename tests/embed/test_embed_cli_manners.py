"""`nova embed` as a new user meets it (one process, the real command): a corpus is embedded as passages by
default and the first lines say so (and that the weights are random); an existing OUT_DIR needs --resume or
--overwrite; what can be checked before a model loads is refused at once, in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

TEXTS = ["the river bends at the mill", "a wolf crossed the frozen lake", "bread rises in a warm oven"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    return path


def _vectors(out) -> np.ndarray:
    table = pq.read_table(out)
    order = np.argsort(table.column("id").to_pylist())
    return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)[order]


def _side(tiny_model, task: str) -> np.ndarray:
    return np.stack(tiny_model.encode([{"text": t, "task": task} for t in TEXTS], return_numpy=True))


def test_a_corpus_is_embedded_as_passages_and_the_first_lines_say_so(run_cli, tiny_model, corpus, tmp_path):
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--no-progress")
    assert code == 0, stderr
    got = _vectors(tmp_path / "out")
    passage, query = _side(tiny_model, "retrieval.passage"), _side(tiny_model, "retrieval.query")
    assert (got * passage).sum(1).min() >= 0.9999
    assert (got * query).sum(1).max() < 0.999  # the query side is another vector
    first = stderr.splitlines()[:2]
    assert first[0].startswith("nova embed: warning: the model has RANDOM WEIGHTS"), stderr
    assert first[1] == ("nova embed: rows without a 'task' are embedded as retrieval.passage (prompt 'Passage: ', "
                        "adapter retrieval); a row's own 'task' wins"), stderr
    assert json.loads((tmp_path / "out" / "_nova_embed.json").read_text())["defaults"]["task"] == "retrieval.passage"

    # told otherwise, it embeds queries: the vectors of the explicit task, unchanged, and a note that they are queries
    code, _, stderr = run_cli("embed", corpus, tmp_path / "queries", "--no-ray", "--no-progress", "--task", "retrieval")
    assert code == 0, stderr
    assert (_vectors(tmp_path / "queries") * query).sum(1).min() >= 0.9999
    assert "embedded as retrieval (prompt 'Query: '" in stderr
    assert "note: --task retrieval embeds rows as queries; a corpus is embedded with --task retrieval.passage" in stderr
    code, _, stderr = run_cli("embed", corpus, tmp_path / "descriptive", "--no-ray", "--no-progress",
                              "--prompt-set", "descriptive")
    assert code == 0, stderr
    assert "(prompt 'Represent this document for retrieval: ', adapter retrieval)" in stderr


def test_an_existing_out_dir_needs_resume_or_overwrite(run_cli, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("embed", corpus, out, "--no-ray", "--no-progress")[0] == 0
    manifest = (out / "_nova_embed.json").read_text()
    code, _, stderr = run_cli("embed", corpus, out, "--no-ray", "--no-progress")
    assert code == 2
    assert stderr.splitlines()[-1] == (f"nova embed: error: OUT_DIR {out} already exists and is not empty: add "
                                       "--overwrite to replace it, or --resume to continue its run, or choose "
                                       "another folder")
    code, _, stderr = run_cli("embed", corpus, out, "--no-ray", "--no-progress", "--resume")
    assert code == 0 and "resuming: 1 of 1 part(s) already written" in stderr, stderr

    # --overwrite starts over: a part of an earlier run with other settings is gone, the new run is complete
    shutil.copy(out / "part-00000.parquet", out / "part-00007.parquet")
    code, _, stderr = run_cli("embed", corpus, out, "--no-ray", "--no-progress", "--overwrite", "--dimensions", "16")
    assert code == 0, stderr
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]
    assert _vectors(out).shape == (3, 16) and (out / "_nova_embed.json").read_text() != manifest

    # someone else's file in the folder: --overwrite deletes nothing, --resume has nothing to finish
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, stderr = run_cli("embed", corpus, other, "--no-ray", "--overwrite")
    assert code == 2 and "--overwrite replaces only what `nova embed` wrote, and the folder also holds notes.txt" \
        in stderr
    code, _, stderr = run_cli("embed", corpus, other, "--no-ray", "--resume")
    assert code == 2 and "holds no `nova embed` run to finish" in stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal
        run_cli("embed", corpus, other, "--no-ray", "--resume", "--overwrite")
    assert exited.value.code == 2 and "--overwrite: not allowed with argument --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "retreival.passage"], "nova embed: error: --task: unknown task 'retreival.passage'; known tasks: "),
        (["--prompt-set", "fancy"], "nova embed: error: --prompt-set: unknown prompt set 'fancy'; known: descriptive"),
        (["--dimensions", "50"], "nova embed: error: --dimensions: dimensions must be one of [16, 32, 64], got 50"),
        (["--load-lora", "mine=/no/such/adapter"],
         "nova embed: error: --load-lora mine=/no/such/adapter: adapter folder not found: /no/such/adapter"),
        (["--model", "/no/such/model"], "nova embed: error: model /no/such/model: not found"),
        (["--cuda-graphs", "--device", "cpu"], "nova embed: error: --cuda-graphs needs CUDA (drop --device cpu)"),
    ],
)
def test_settings_are_checked_before_anything_loads(run_cli, corpus, tmp_path, args, message):
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", *args)
    assert code == 2
    assert stderr.splitlines()[-1].startswith(message), stderr
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()


def test_remote_code_needs_trust_and_a_failed_run_is_one_line(run_cli, corpus, tiny_dir, tmp_path):
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--model", tiny_dir)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith(f"nova embed: error: {tiny_dir} carries its own code")
    assert "--trust-remote-code" in stderr.splitlines()[-1]

    # a model whose config reads but whose weights are missing fails in the worker: one line, traceback on demand
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copy(tiny_dir / "config.json", broken / "config.json")
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--model", broken, "--no-progress")
    assert code == 1 and "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("nova embed: error: the run stopped: ") and "--resume" in last, stderr
    assert last.endswith("(--log-level debug shows the traceback)")
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--model", broken, "--no-progress",
                              "--resume", "--log-level", "debug")
    assert code == 1 and "Traceback (most recent call last)" in stderr


def test_cuda_graphs_without_cuda_stop_the_run_loudly(run_cli, corpus, tmp_path):
    """On a machine without CUDA the worker refuses the switch: never vectors quietly made without it."""
    code, _, stderr = run_cli("embed", corpus, tmp_path / "out", "--no-ray", "--no-progress", "--cuda-graphs")
    assert code == 1 and "CUDA graphs need the model on a CUDA device; it is on cpu" in stderr.splitlines()[-1], stderr
