"""Embed, score, rank and measure each variant; the library behind `nova eval`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nova.maxsim import maxsim_scores as summed_maxsim
from nova.maxsim import padded
from nova.repo import model_class

from . import metrics as metrics_mod
from .cache import EmbeddingCache, corpus_fingerprint
from .dataset import BeirDataset
from .embedders import Embedder, stable_hash
from .errors import UserInputError
from .variants import Variant


@dataclass
class VariantResult:
    variant: Variant
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: dict[str, list[tuple[str, float]]]
    corpus_embeddings: str  # "embedded", "cache", "shared"
    seconds: float
    extra: dict = field(default_factory=dict)


def _item(text: str, image: str | None, task: str, adapter: str | None, instructions: str | None) -> dict:
    item: dict = {"task": task}
    if text:
        item["text"] = text
    if image:
        item["image"] = image
    if adapter is not None:
        item["adapter"] = adapter
    if instructions:
        item["instructions"] = instructions
    return item


def passage_items(dataset: BeirDataset, variant: Variant, ids: list[str]) -> list[dict]:
    docs = dataset.corpus
    return [
        _item(docs[i].content(), docs[i].image, variant.passage_task, variant.passage_adapter, variant.passage_instructions)
        for i in ids
    ]


def query_items(dataset: BeirDataset, variant: Variant, ids: list[str]) -> list[dict]:
    qs = dataset.queries
    return [
        _item(qs[i].text, qs[i].image, variant.query_task, variant.query_adapter, variant.query_instructions) for i in ids
    ]


def truncate(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The cached full-size vectors at `dimensions`, by the model's own matryoshka rule."""
    if dimensions is not None and dimensions > vectors.shape[1]:
        raise UserInputError(f"dimensions={dimensions} is larger than the model's {vectors.shape[1]}-d vectors")
    return model_class("matryoshka_truncate")(torch.from_numpy(np.ascontiguousarray(vectors)), dimensions).numpy()


def cosine_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    return queries.astype(np.float32) @ docs.astype(np.float32).T


def maxsim_scores(queries: list[np.ndarray], docs: list[np.ndarray], doc_chunk: int = 256,
                  query_chunk: int = 16) -> np.ndarray:
    """MaxSim (nova.maxsim) of every query against every document, in chunks to bound memory."""
    scores = np.zeros((len(queries), len(docs)), dtype=np.float32)
    with torch.inference_mode():
        for d0 in range(0, len(docs), doc_chunk):
            d, dmask = padded(docs[d0 : d0 + doc_chunk])
            for q0 in range(0, len(queries), query_chunk):
                q, qmask = padded(queries[q0 : q0 + query_chunk])
                scores[q0 : q0 + len(q), d0 : d0 + len(d)] = summed_maxsim(q, qmask, d, dmask).float().numpy()
    return scores


def rank_matrix(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], top_k: int,
                ignore_identical_ids: bool) -> dict[str, list[tuple[str, float]]]:
    """Top ``top_k`` per query, score descending then document id ascending."""
    position = {d: i for i, d in enumerate(doc_ids)}
    order = np.argsort(np.array(doc_ids, dtype=object), kind="stable")
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[order] = np.arange(len(doc_ids))
    run: dict[str, list[tuple[str, float]]] = {}
    k = min(top_k, len(doc_ids))
    for qi, qid in enumerate(query_ids):
        row = scores[qi].astype(np.float64).copy()
        if ignore_identical_ids and qid in position:
            row[position[qid]] = -np.inf
        if k < len(row):
            # keep every document tied with the k-th score, then order exactly
            threshold = np.partition(row, len(row) - k)[len(row) - k]
            candidates = np.nonzero(row >= threshold)[0]
        else:
            candidates = np.arange(len(row))
        candidates = candidates[np.isfinite(row[candidates])]
        ordered = candidates[np.lexsort((id_rank[candidates], -row[candidates]))][:k]
        run[qid] = [(doc_ids[i], float(row[i])) for i in ordered]
    return run


class Evaluator:
    """Evaluates variants on one dataset with one embedder, sharing corpus embeddings between variants."""

    def __init__(self, dataset: BeirDataset, embedder: Embedder, cache: EmbeddingCache, metrics: list[str],
                 top_k: int = 1000, ignore_identical_ids: bool = True, log=print):
        self.dataset = dataset
        self.embedder = embedder
        self.cache = cache
        self.metrics = metrics
        self.top_k = max(top_k, metrics_mod.max_cutoff(metrics))
        self.ignore_identical_ids = ignore_identical_ids
        self.log = log
        self.doc_ids = list(dataset.corpus)
        self.query_ids = list(dataset.queries)
        self._corpus_memory: dict[str, list[np.ndarray]] = {}
        self._query_memory: dict[str, list[np.ndarray]] = {}
        self.corpus_embeddings_computed = 0

    def _corpus(self, variant: Variant) -> tuple[list[np.ndarray], str]:
        settings = variant.passage_settings()
        key = self.cache.key(self.embedder.identity, corpus_fingerprint(self.dataset.path / "corpus.jsonl"), settings)
        if key in self._corpus_memory:
            return self._corpus_memory[key], "shared"
        cached = self.cache.load(key, self.doc_ids)
        if cached is not None:
            self._corpus_memory[key] = cached
            return cached, "cache"
        items = passage_items(self.dataset, variant, self.doc_ids)
        vectors = self.embedder.embed(items, variant.multivector, desc=f"{variant.name}: corpus")
        self.corpus_embeddings_computed += 1
        self.cache.store(key, self.doc_ids, vectors, variant.multivector, {"settings": settings})
        self._corpus_memory[key] = vectors
        return vectors, "embedded"

    def _queries(self, variant: Variant) -> list[np.ndarray]:
        key = stable_hash(variant.query_settings())
        if key not in self._query_memory:
            items = query_items(self.dataset, variant, self.query_ids)
            self._query_memory[key] = self.embedder.embed(items, variant.multivector, desc=f"{variant.name}: queries")
        return self._query_memory[key]

    def run_variant(self, variant: Variant) -> VariantResult:
        start = time.perf_counter()
        docs, source = self._corpus(variant)
        queries = self._queries(variant)
        if variant.multivector:
            if any(d.ndim != 2 for d in docs[:1] + queries[:1]):
                raise UserInputError(f"variant '{variant.name}': the backend did not return multi-vectors")
            scores = maxsim_scores(queries, docs)
        else:
            if any(d.ndim != 1 for d in docs[:1] + queries[:1]):
                raise UserInputError(f"variant '{variant.name}': the backend did not return single vectors")
            scores = cosine_scores(truncate(np.stack(queries), variant.dimensions), truncate(np.stack(docs), variant.dimensions))
        run = rank_matrix(scores, self.query_ids, self.doc_ids, self.top_k, self.ignore_identical_ids)
        means, per_query = metrics_mod.evaluate(self.dataset.qrels, run, self.metrics, per_query=True)
        seconds = time.perf_counter() - start
        return VariantResult(variant, means, per_query, run, source, seconds)

    def run(self, variants: list[Variant]) -> list[VariantResult]:
        results = []
        for variant in variants:
            result = self.run_variant(variant)
            summary = ", ".join(f"{m} {v:.4f}" for m, v in result.metrics.items())
            self.log(f"[{variant.name}] {summary} (corpus: {result.corpus_embeddings}, {result.seconds:.1f}s)")
            results.append(result)
        return results


def write_trec(path: Path, run: dict[str, list[tuple[str, float]]], tag: str) -> None:
    """Standard TREC run lines: ``qid Q0 docid rank score tag`` (rank from 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for qid, ranking in run.items():
            for position, (doc_id, score) in enumerate(ranking, start=1):
                handle.write(f"{qid} Q0 {doc_id} {position} {score:.8f} {tag}\n")


def read_trec(path: Path) -> dict[str, list[tuple[str, float]]]:
    run: dict[str, list[tuple[str, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _q0, doc_id, _rank, score, _tag = line.split()
        run.setdefault(qid, []).append((doc_id, float(score)))
    return run
