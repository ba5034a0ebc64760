"""MTEB through sentence-transformers: an in-memory retrieval task (MTEB's datasets cannot be downloaded
here) scores exactly what `nova eval` scores on the same BEIR folder, with and without the task's instruction."""

from __future__ import annotations

import json

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

from mteb.types import PromptType  # noqa: E402

from nova.evaluation.mteb_model import NovaMTEBModel, beir_task, nova_task_for  # noqa: E402

INSTRUCTION = "Given a query made of object words, find the passage that names their partners."


def in_memory_task(beir_dir, prompt=None, task_type="Retrieval", domains=None):
    return beir_task(beir_dir, name="NovaInMemoryRetrieval", prompt=prompt, task_type=task_type, domains=domains)


def mteb_scores(model, task) -> dict:
    results = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    return results.task_results[0].scores["test"][0]


@pytest.fixture(scope="module")
def mteb_model(tiny_dir):
    return NovaMTEBModel(str(tiny_dir), device="cpu")


def test_mteb_scores_equal_nova_eval_with_and_without_instructions(synthetic, tiny_dir, mteb_model, run_cli, tmp_path):
    out = tmp_path / "eval"
    code, _, err = run_cli("eval", synthetic["eval"], "--model", tiny_dir, "--out", out, "--no-cache", "--no-plot",
                           "--no-progress", "--instructions", INSTRUCTION)
    assert code == 0, err
    nova = json.loads((out / "results.json").read_text())["results"]

    # a plain-string task prompt: MTEB offers it for both sides; Nova instructs the queries only (as `nova eval`)
    instructed = mteb_scores(mteb_model, in_memory_task(synthetic["eval"], prompt=INSTRUCTION))
    mteb_model.instructions = "none"
    try:
        baseline = mteb_scores(mteb_model, in_memory_task(synthetic["eval"], prompt=INSTRUCTION))
    finally:
        mteb_model.instructions = "query"

    pairs = {"nDCG@10": "ndcg_at_10", "P@10": "precision_at_10", "MRR@10": "mrr_at_10", "Recall@100": "recall_at_100"}
    for ours, theirs in pairs.items():
        assert baseline[theirs] == pytest.approx(nova["baseline"][ours], abs=1e-5), ours
        assert instructed[theirs] == pytest.approx(nova["instructions-1"][ours], abs=1e-5), ours
    # the instruction really reached the model: the two runs rank differently
    assert baseline["ndcg_at_10"] != pytest.approx(instructed["ndcg_at_10"], abs=1e-6)


def test_mteb_instruction_goes_to_queries_only_unless_asked(synthetic, mteb_model):
    metadata = in_memory_task(synthetic["eval"], prompt=INSTRUCTION).metadata
    sides = {}
    try:
        for setting in ("query", "both", "none"):
            mteb_model.instructions = setting
            sides[setting] = [mteb_model.instruction_for(metadata, side)
                              for side in (PromptType.query, PromptType.document, None)]
    finally:
        mteb_model.instructions = "query"
    assert sides == {"query": [INSTRUCTION, None, INSTRUCTION], "both": [INSTRUCTION] * 3, "none": [None] * 3}
    with pytest.raises(ValueError, match="instructions must be one of"):
        NovaMTEBModel("unused", instructions="documents")  # refused before anything loads


def test_task_types_map_to_nova_tasks(synthetic):
    def meta(task_type, domains=None):
        return in_memory_task(synthetic["eval"], task_type=task_type, domains=domains).metadata

    assert nova_task_for(meta("Retrieval")) == "retrieval"
    assert nova_task_for(meta("Retrieval", ["Programming"])) == "code"
    assert nova_task_for(meta("STS")) == "text-matching"
    assert nova_task_for(meta("Clustering")) == "text-matching"


def test_mteb_encode_uses_the_st_route(synthetic, mteb_model, tiny_model):
    """What MTEB's retrieval evaluator gets for queries and documents is Nova's own encode, side by side."""
    from torch.utils.data import DataLoader

    task = in_memory_task(synthetic["eval"], prompt={"query": INSTRUCTION})
    texts = ["apple river", "stone cloud music"]
    loader = DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=1)
    queries = mteb_model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                                prompt_type=PromptType.query)
    documents = mteb_model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                                  prompt_type=PromptType.document)
    ref_q = tiny_model.encode([{"text": t, "task": "retrieval.query"} for t in texts], instructions=INSTRUCTION)
    ref_d = tiny_model.encode([{"text": t, "task": "retrieval.passage"} for t in texts])
    for got, want in zip(list(queries) + list(documents), ref_q + ref_d, strict=True):
        assert float(np.dot(got, want.numpy())) >= 0.9999


def test_per_query_instructions_become_item_instructions(synthetic, mteb_model, tiny_model):
    """Instruction-retrieval tasks carry an `instruction` column that MTEB glues onto the query text; Nova takes
    the query as written and the instruction as a real instruction (a system turn, never pooled)."""
    from torch.utils.data import DataLoader

    rows = {"query": ["apple river", "stone cloud"], "instruction": ["Find fruit.", None],
            "text": ["apple river Find fruit.", "stone cloud"]}
    loader = DataLoader(datasets.Dataset.from_dict(rows), batch_size=2)
    task = in_memory_task(synthetic["eval"], prompt=INSTRUCTION)
    got = mteb_model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                            prompt_type=PromptType.query)
    want = tiny_model.encode([{"text": "apple river", "task": "retrieval.query", "instructions": "Find fruit."},
                              {"text": "stone cloud", "task": "retrieval.query"}], instructions=INSTRUCTION)
    for g, w in zip(got, want, strict=True):
        assert float(np.dot(g, w.numpy())) >= 0.9999
