"""Nova as an MTEB model, through sentence-transformers (the repository's own `modules.json` route).

    import mteb
    from nova.evaluation.mteb_model import NovaMTEBModel
    results = mteb.evaluate(NovaMTEBModel("path/to/nova"), mteb.get_tasks(tasks=["SciFact"]))
    results = mteb.evaluate(NovaMTEBModel("path/to/nova"), beir_task("my-beir-folder"))   # your own data

What MTEB hands a model, and what Nova makes of it:
- the task type picks the Nova task: retrieval-like tasks -> `retrieval` (`code` when the task's domains include
  "Programming"), everything symmetric (STS, pair classification, clustering, classification, ...) -> `text-matching`;
- the prompt type picks the side: queries -> `<task>.query`, documents -> `<task>.passage`; symmetric tasks have
  no side and embed as queries, as `encode_text` does;
- MTEB's per-task instruction (`task_metadata.prompt`, or `prompts_dict`) reaches Nova as an *instruction*
  (a system turn, never pooled), on the query side only by default: `instructions="query"`; `"both"` also
  instructs documents, `"none"` gives the Jina V4 baseline. Per-query instructions of instruction-retrieval
  tasks (an `instruction` column) become per-item instructions instead of text glued to the query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

RETRIEVAL_TYPES = {"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking", "Any2AnyRetrieval",
                   "Any2AnyMultilingualRetrieval", "VisionCentricQA", "DocumentUnderstanding"}
INSTRUCTION_SIDES = ("query", "both", "none")


def beir_task(path, *, split: str = "test", name: str | None = None, prompt=None, task_type: str = "Retrieval",
              domains: list[str] | None = None):
    """An MTEB retrieval task over a BEIR folder, read by `nova eval`'s own loader: the same queries, corpus and
    judgements `nova eval` scores, so the two reports can be compared. `prompt` is MTEB's task instruction (a
    string, or {"query": ..., "document": ...})."""
    import datasets
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    from .dataset import load_beir

    data = load_beir(path, split=split)
    if any(doc.image for doc in data.corpus.values()) or any(q.image for q in data.queries.values()):
        raise ValueError(f"{path}: beir_task builds text retrieval tasks; this folder has images")
    metadata = TaskMetadata(
        name=name or f"BEIR-{Path(path).resolve().name}", type=task_type, main_score="ndcg_at_10", prompt=prompt,
        description=f"BEIR folder {path}", reference=None, dataset={"path": str(path), "revision": "local"},
        category="t2t", eval_splits=[split], eval_langs=["eng-Latn"], date=None, dialect=[], domains=domains or [],
        task_subtypes=[], license="not specified", annotations_creators="derived", modalities=["text"],
        sample_creation="found", bibtex_citation="",
    )

    class BeirFolderTask(AbsTaskRetrieval):
        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {split: RetrievalSplitData(
                queries=datasets.Dataset.from_list([{"id": q.id, "text": q.text} for q in data.queries.values()]),
                corpus=datasets.Dataset.from_list([{"id": d.id, "title": d.title, "text": d.text}
                                                   for d in data.corpus.values()]),
                relevant_docs=data.qrels,
                top_ranked=None,
            )}}
            self.data_loaded = True

    BeirFolderTask.metadata = metadata
    return BeirFolderTask()


def nova_task_for(task_metadata) -> str:
    """MTEB task metadata -> Nova task family (retrieval, code or text-matching)."""
    if task_metadata.type in RETRIEVAL_TYPES:
        return "code" if "Programming" in (task_metadata.domains or []) else "retrieval"
    return "text-matching"


class NovaMTEBModel(AbsEncoder):
    """An MTEB encoder over `SentenceTransformer(<nova dir>, trust_remote_code=True)`."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 instructions: str = "query", prompts_dict: dict[str, str] | None = None, batch_size: int = 16,
                 model_kwargs: dict | None = None, **kwargs: Any):
        from sentence_transformers import SentenceTransformer

        if instructions not in INSTRUCTION_SIDES:
            raise ValueError(f"instructions must be one of {INSTRUCTION_SIDES}, got {instructions!r}")
        if kwargs:
            raise ValueError(f"NovaMTEBModel does not use {sorted(kwargs)}")
        self.model = SentenceTransformer(model_name, revision=revision, device=device, trust_remote_code=True,
                                         model_kwargs=model_kwargs)
        self.instructions = instructions
        self.prompts_dict = prompts_dict
        self.batch_size = batch_size
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": f"nova/{str(model_name).rstrip('/').rsplit('/', 1)[-1]}",
            "revision": revision or "local",
            "embed_dim": self.model.get_embedding_dimension(),
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": instructions != "none",
            "framework": ["Sentence Transformers", "PyTorch"],
        })

    def instruction_for(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The task's instruction for this side, or None (documents unless `instructions="both"`)."""
        if self.instructions == "none" or (prompt_type == PromptType.document and self.instructions != "both"):
            return None
        return self.get_task_instruction(task_metadata, prompt_type) or None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        items = [item for batch in inputs for item in _batch_items(batch)]
        side = "passage" if prompt_type == PromptType.document else "query"
        return self.model.encode(
            items, task=nova_task_for(task_metadata), prompt_name=side,
            instructions=self.instruction_for(task_metadata, prompt_type),
            batch_size=kwargs.get("batch_size", self.batch_size), show_progress_bar=kwargs.get("show_progress_bar", False),
            convert_to_numpy=True,
        )


def _batch_items(batch: dict) -> list:
    """One MTEB batch -> Nova inputs: text, image, or item dicts for text+image and per-query instructions."""
    texts = batch.get("query", batch.get("text"))  # "query": the text before MTEB glued an instruction to it
    images = batch.get("image")
    per_query = batch.get("instruction") if "query" in batch else None
    size = len(texts if texts is not None else images)
    items = []
    for i in range(size):
        item = {}
        if texts is not None:
            item["text"] = texts[i]
        if images is not None and images[i] is not None:
            item["image"] = images[i]
        if per_query is not None and per_query[i]:
            item["instructions"] = per_query[i]
        items.append(item)
    return items
