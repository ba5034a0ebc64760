"""Data loading, the InfoNCE loss, target presets, resume, starting from an existing adapter, bad input."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nova.evaluation.errors import UserInputError
from nova.training.data import load_triplets
from nova.training.loss import Contrast, duplicate_mask, info_nce, maxsim_scores
from nova.training.trainer import TARGET_PRESETS, resolve_targets


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- data ------------------------------------------------------------------------------------------------

def test_triplets_text_images_and_instructions(tmp_path):
    from PIL import Image

    Image.new("RGB", (28, 28), "blue").save(tmp_path / "blue.png")
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"query": "q", "positive": "p", "negatives": ["n1", "n2"]},
        {"query": {"text": "a blue square"}, "positive": {"image": "blue.png"}, "query_instructions": "Find images."},
        {"query": "q", "positive": "p", "instructions": "Both sides.", "negatives": "single"},
        {"query": {"text": "x", "instructions": "own"}, "positive": "p", "query_instructions": "line", "id": 7},
    ])
    rows = load_triplets(path)
    assert rows[0].query == {"text": "q", "task": "retrieval.query", "adapter": "none"}
    assert [n["text"] for n in rows[0].negatives] == ["n1", "n2"]
    assert rows[1].positive["image"] == str((tmp_path / "blue.png").resolve())
    assert rows[1].query["instructions"] == "Find images." and "instructions" not in rows[1].positive
    assert rows[2].query["instructions"] == rows[2].positive["instructions"] == "Both sides."
    assert rows[2].negatives[0]["instructions"] == "Both sides."
    assert rows[3].query["instructions"] == "own" and rows[3].line == 4
    assert load_triplets(path, max_negatives=1)[0].negatives[0]["text"] == "n1"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"query": "q", "positive": "p"}', '{"query": "q", "positive": }'], r"line 2: malformed JSON"),
        (['{"query": "q"}'], r"line 1: missing required key 'positive'"),
        (['{"query": "q", "positive": "p", "negative": "n"}'], r"line 1: unknown key\(s\) \['negative'\] \(did you mean 'negatives'\?\)"),
        (['{"query": "q", "positive": {"image": "nope.png"}}'], r"line 1: 'positive' image not found: nope.png"),
        (['{"query": "", "positive": "p"}'], r"line 1: 'query' is an empty string"),
        (['{"query": 3, "positive": "p"}'], r"line 1: 'query' must be a string or an object"),
        (['{"query": "q", "positive": "p", "negatives": [{"colour": 1}]}'], r"line 1: 'negatives\[0\]' has unknown key"),
        (['', '  '], r"no training examples"),
    ],
)
def test_bad_training_data(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(UserInputError, match=message):
        load_triplets(path)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: write_jsonl(d / "t.jsonl", ['{"query": "q", "positive": "p"}', "{oops"]), [],
         "t.jsonl line 2: malformed JSON"),
        (lambda d: None, [], "t.jsonl: file not found"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--targets", "no_such_module"],
         "matches no Linear module"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--targets", "model.(layers"],
         "nor a valid regex"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--init-adapter", "nope"],
         "neither a loaded adapter"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--resume"], "no checkpoint under"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--temperature", "0"],
         "--temperature must be positive"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--mini-batch-size", "0"],
         "--mini-batch-size must be at least 1"),
        (lambda d: write_jsonl(d / "t.jsonl", [{"query": "q", "positive": "p"}]), ["--targets", "projector"],
         "only reaches the vision tower, but"),
    ],
)
def test_cli_bad_input_exit_code_2(tmp_path, run_cli, setup, args, message):
    setup(tmp_path)
    code, _, err = run_cli("train", "--data", tmp_path / "t.jsonl", "--out", tmp_path / "out", "--steps", "1",
                           "--no-progress", *args)
    assert code == 2, err
    assert "Traceback" not in err and message in err, err
    errors = [line for line in err.splitlines() if line.startswith("nova train") and "RANDOM WEIGHTS" not in line]
    assert errors == [err.strip().splitlines()[-1]]


# ---- loss ------------------------------------------------------------------------------------------------

def test_info_nce_matches_the_formula():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=-1)
    c = F.normalize(torch.randn(7, 8), dim=-1)  # 3 positives + 4 hard negatives
    scores = q @ c.T
    t = 0.05
    expected = sum(-math.log(math.exp(scores[i, i] / t) / sum(math.exp(s / t) for s in scores[i].tolist()))
                   for i in range(3)) / 3
    assert float(info_nce(scores, t)) == pytest.approx(expected, rel=1e-5)
    # higher temperature -> softer distribution -> for random scores a loss closer to log(P)
    assert abs(float(info_nce(scores, 100.0)) - math.log(7)) < 0.01


def test_duplicate_positives_are_not_negatives():
    keys = [("a",), ("b",), ("a",)]
    candidates = keys + [("c",), ("a",)]
    mask = duplicate_mask(keys, candidates)
    assert mask[0].tolist() == [False, False, True, False, True]
    assert mask[1].tolist() == [False] * 5
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])
    masked = float(info_nce(scores, 1.0, mask))
    unmasked = float(info_nce(scores, 1.0))
    assert masked < unmasked


def test_candidates_above_the_positive_by_the_margin_are_dropped_as_false_negatives():
    """Row 0's candidate 3 scores 0.3 above its positive: dropped with a margin of 0.1, kept with 0.5; a
    candidate just under positive + margin (row 1's candidate 4) always stays."""
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.8, 0.0], [0.1, 0.6, 0.0, 0.2, 0.69]], requires_grad=True)
    dropped = torch.zeros(2, 5, dtype=torch.bool)
    dropped[0, 3] = True
    assert float(Contrast(0.05, 0.1).loss(scores)) == pytest.approx(float(info_nce(scores, 0.05, dropped)), rel=1e-6)
    assert float(Contrast(0.05, 0.5).loss(scores)) == pytest.approx(float(info_nce(scores, 0.05)), rel=1e-6)
    assert float(Contrast(0.05).loss(scores)) == pytest.approx(float(info_nce(scores, 0.05)), rel=1e-6)
    # the decision carries no gradient: a dropped column gets none
    Contrast(0.05, 0.1).loss(scores).backward()
    assert scores.grad[0, 3] == 0 and scores.grad[1, 4] != 0
    with pytest.raises(ValueError, match="margin must not be negative"):
        Contrast(0.05, -0.1)


def test_negatives_per_query_counts_what_the_margin_drops():
    """4 triplets, 8 candidates (4 positives, 4 hard negatives; candidate 6 is row 0's positive again): 6.75
    negatives per query, duplicates masked. One-hot candidates make each query vector its row of scores. With
    a margin of 0.1, row 0 drops candidate 3 (and 6, already masked: not counted twice) and row 1 drops 4 and
    7; row 2's candidate 0, 0.05 above its positive, stays: 3 fewer negatives over 4 queries."""
    from nova.training.contrastive import ContrastiveBatch, Embeddings, embedding_gradients
    from nova.training.data import Triplet
    from nova.training.distributed import Processes

    def item(text):
        return {"text": text, "task": "retrieval.passage"}

    batch = ContrastiveBatch([
        Triplet(1, item("q0"), item("p0"), [item("n0"), item("n1")]),
        Triplet(2, item("q1"), item("p1")),
        Triplet(3, item("q2"), item("p2"), [item("p0")]),
        Triplet(4, item("q3"), item("p3"), [item("n3")]),
    ])
    scores = torch.zeros(4, 8)
    scores[torch.arange(4), torch.arange(4)] = 0.5
    scores[0, 3] = scores[0, 6] = 0.9
    scores[1, 4] = scores[1, 7] = 0.8
    scores[2, 0] = 0.55
    candidates = torch.eye(8)

    def reported(margin):
        got = embedding_gradients(batch, Embeddings(scores), Embeddings(candidates[:4]), Embeddings(candidates[4:]),
                                  batch.ignore, Contrast(0.05, margin), Processes())
        return got.negatives_per_query

    assert reported(None) == 6.75
    assert reported(0.1) == 6.75 - 3 / 4
    assert reported(0.5) == 6.75  # nothing above its positive by more than 0.5


def test_maxsim_scores():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two query tokens
    d = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [9.0, 9.0]]])  # last token is padding
    got = maxsim_scores(q, torch.tensor([[True, True]]), d, torch.tensor([[True, True, False]]))
    assert float(got[0, 0]) == pytest.approx((1.0 + 0.8) / 2)


# ---- targets ---------------------------------------------------------------------------------------------

def test_target_presets(tiny_model):
    _, projector = resolve_targets(tiny_model, "projector")
    assert projector == ["visual.merger.mlp.0", "visual.merger.mlp.2"]
    _, llm = resolve_targets(tiny_model, "llm")
    assert len(llm) == 15 and "multi_vector_projector" in llm and not any(n.startswith("visual") for n in llm)
    _, everything = resolve_targets(tiny_model, "all")
    assert set(projector) | set(llm) < set(everything) and "visual.blocks.0.attn.qkv" in everything
    pattern, custom = resolve_targets(tiny_model, r"model\.layers\.1\..*")  # also matches non-Linear modules
    assert custom == [n for n in llm if n.startswith("model.layers.1.")]
    import re

    assert all(re.fullmatch(pattern, n) for n in custom)
    assert set(TARGET_PRESETS) == {"projector", "llm", "all"}


# ---- resume, starting adapters, images --------------------------------------------------------------------

def _train(run_cli, data, out, *extra):
    code, stdout, err = run_cli("train", "--data", data, "--out", out, "--batch-size", "4", "--lr", "1e-2",
                                "--rank", "4", "--no-progress", *extra)
    assert code == 0, err
    return stdout


def test_resume_continues_exactly(task, tmp_path, run_cli):
    data = write_jsonl(tmp_path / "small.jsonl", Path(task["train"]).read_text().splitlines()[:16])
    _train(run_cli, data, tmp_path / "straight", "--steps", "6")
    _train(run_cli, data, tmp_path / "resumed", "--steps", "6", "--checkpoint-every", "3")
    # an interrupted run: keep only the step-3 checkpoint and train again with --resume
    resumed = tmp_path / "resumed"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (resumed / name).unlink()
    out = _train(run_cli, data, resumed, "--steps", "6", "--resume")
    assert "resumed from" in out and "step-0000003" in out
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    code, _, err = run_cli("train", "--data", data, "--out", resumed, "--steps", "6", "--resume", "--rank", "8",
                           "--no-progress")
    assert code == 2 and "settings differ from the checkpoint" in err


def test_start_from_an_existing_adapter(task, tmp_path, run_cli, tiny_dir, tiny_model):
    from nova.loading import load_model

    data = write_jsonl(tmp_path / "small.jsonl", Path(task["train"]).read_text().splitlines()[:8])
    out = tmp_path / "continued"
    code, _, err = run_cli("train", "--data", data, "--out", out, "--steps", "1", "--lr", "1e-9", "--batch-size", "4",
                           "--init-adapter", "retrieval", "--no-progress")
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4  # the tiny retrieval adapter's rank and alpha
    fresh = load_model(tiny_dir)
    fresh.load_adapter("continued", str(out))
    items = [{"task": "retrieval.query", "text": "river stone"}, {"task": "retrieval.passage", "text": "ocean wolf"}]
    continued = torch.stack(fresh.encode([dict(i, adapter="continued") for i in items]))
    retrieval = torch.stack(tiny_model.encode([dict(i, adapter="retrieval") for i in items]))
    assert torch.allclose(continued, retrieval, atol=1e-5)  # one step at lr 1e-9 keeps retrieval's weights
    # and from a folder (the adapter just written), rank flags that contradict it are refused
    code, _, err = run_cli("train", "--data", data, "--out", tmp_path / "again", "--steps", "1", "--init-adapter", out,
                           "--rank", "8", "--no-progress")
    assert code == 2 and "the starting adapter has rank 4" in err


def test_projector_preset_trains_on_images(tmp_path, run_cli, tiny_dir):
    from PIL import Image

    from nova.loading import load_model

    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{i}.png")
    rows = [{"query": f"colour {c}", "positive": {"image": f"{i}.png"}}
            for i, c in enumerate(["red", "green", "blue", "yellow"])]
    # text-only triplets too: their micro-batches give the merger no gradient and are skipped, not a crash
    rows += [{"query": f"word {i}", "positive": f"text {i}"} for i in range(4)]
    data = write_jsonl(tmp_path / "images.jsonl", rows)
    out = tmp_path / "projector"
    log = _train(run_cli, data, out, "--steps", "8", "--targets", "projector", "--batch-size", "2")
    assert "it is skipped" in log  # this seed's order has a text-only micro-batch
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0] for k in tensors} == {"base_model.model.visual.merger.mlp.0",
                                                        "base_model.model.visual.merger.mlp.2"}
    assert "merger" in config["target_modules"]
    model = load_model(tiny_dir)
    model.load_adapter("projector", str(out))
    image_item = {"task": "retrieval.passage", "image": str(tmp_path / "0.png")}
    tuned = model.encode([dict(image_item, adapter="projector")])[0]
    base = model.encode([dict(image_item, adapter="none")])[0]
    assert float((tuned - base).abs().max()) > 0  # the merger LoRA changes image vectors
    text_item = {"task": "retrieval.query", "text": "colour red"}
    assert torch.equal(model.encode([dict(text_item, adapter="projector")])[0],
                       model.encode([dict(text_item, adapter="none")])[0])  # and leaves text alone


@pytest.mark.parametrize("vectors", ["multi", "both"])
def test_multi_vector_losses(task, tmp_path, run_cli, vectors):
    data = write_jsonl(tmp_path / "small.jsonl", Path(task["train"]).read_text().splitlines()[:8])
    out = tmp_path / vectors
    _train(run_cli, data, out, "--steps", "2", "--vectors", vectors, "--gradient-checkpointing")
    summary = json.loads((out / "nova_training.json").read_text())
    assert math.isfinite(summary["final_loss"]) and summary["reload_max_abs_diff"] < 1e-5
    assert summary["config"]["vectors"] == vectors


def test_the_synthetic_tasks_hard_negatives_never_answer_another_training_query(task):
    """A hard negative that is another training query's answer (its two passage words, other fillers) would be a
    false negative for that query whenever both share a batch, more often the larger the batch."""
    import json

    rows = [json.loads(line) for line in open(task["train"], encoding="utf-8")]
    fillers = {w for w, _ in collections.Counter(w for r in rows for w in r["positive"].split()).most_common(8)}

    def answer(passage: str) -> frozenset:
        return frozenset(w for w in passage.split() if w not in fillers)

    answers = {answer(r["positive"]) for r in rows}
    assert len(answers) == len(rows) == 240 and all(len(a) == 2 for a in answers)
    negatives = [answer(n) for r in rows for n in r["negatives"]]
    assert len(negatives) == 720 and all(len(n) == 2 for n in negatives)
    assert not [n for n in negatives if n in answers]
