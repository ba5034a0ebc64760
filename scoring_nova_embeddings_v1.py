"""Scoring and reranking: MaxSim (ColBERT / Jina V4 late interaction) and pooled cosine, defined once.

Training (with gradients), evaluation, the playground, the server and `model.rerank()` all score with these
functions, so a score means the same everywhere.

Score scales, for the model's vectors (pooled vectors and every multi-vector row are L2-normalized):
- `maxsim`: for each query token the best document token's dot product (a cosine), summed over the query's
  tokens. Not normalized: it lies in [-n_q, n_q] for a query of n_q multi-vector rows, which is what Jina V4,
  ColBERT, Qdrant's `MAX_SIM` and LanceDB's multivector search compute. Scores compare across documents of
  one query, not across queries.
- `maxsim` with `normalize=True`: the same sum divided by n_q, in [-1, 1] (a mean of cosines): the same order,
  a scale comparable across queries and with `cosine`.
- `cosine`: the pooled vectors' cosine, in [-1, 1] (`normalize` changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCORINGS = ("maxsim", "cosine")
# The passage side of a task is its `.passage` twin; a task without one (text-matching) is symmetric.
SIDES = (".query", ".passage")
# Documents scored against the query at once: bounds the [chunk, n_q, n_doc_tokens] similarity tensor.
SCORING_CHUNK = 64


def maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, candidates: torch.Tensor,
                  candidate_mask: torch.Tensor) -> torch.Tensor:
    """[B, Lq, d] x [P, Lp, d] (masks [B, Lq], [P, Lp]: real tokens) -> [B, P] summed MaxSim scores."""
    sim = torch.einsum("bqd,pld->bpql", queries, candidates)
    sim = sim.masked_fill(~candidate_mask[None, :, None, :], float("-inf")).amax(-1)
    return (sim * query_mask[:, None, :]).sum(-1)


def padded(arrays: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-vectors of different lengths (numpy arrays or tensors, [n_i, d]) -> ([N, L, d] zero-padded,
    [N, L] mask of real tokens), in the first array's dtype."""
    arrays = [np.asarray(a) for a in arrays]
    length = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), length, arrays[0].shape[1], dtype=torch.from_numpy(arrays[0][:0]).dtype)
    mask = torch.zeros(len(arrays), length, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=arrays[0].dtype))
        mask[i, : len(a)] = True
    return out, mask


def maxsim(query, candidate) -> float:
    """The score of one query/candidate pair of multi-vectors ([n, d] each)."""
    q, qmask = padded([np.asarray(query)])
    c, cmask = padded([np.asarray(candidate, dtype=np.asarray(query).dtype)])
    return float(maxsim_scores(q, qmask, c, cmask)[0, 0])


def late_interaction_scores(query, documents: Sequence, chunk: int = SCORING_CHUNK) -> torch.Tensor:
    """MaxSim of one query multi-vector [n_q, d] against each document's [n_i, d] -> [P] float32."""
    q, qmask = padded([_float32(query)])
    scores = []
    for start in range(0, len(documents), chunk):
        docs, dmask = padded([_float32(d) for d in documents[start : start + chunk]])
        scores.append(maxsim_scores(q, qmask, docs, dmask)[0])
    return torch.cat(scores)


def cosine_scores(query, documents: Sequence) -> torch.Tensor:
    """Cosine of one pooled vector [d] against each document's [d] -> [P] float32."""
    q = torch.nn.functional.normalize(torch.from_numpy(_float32(query)), dim=-1)
    docs = torch.nn.functional.normalize(torch.from_numpy(np.stack([_float32(d) for d in documents])), dim=-1)
    return docs @ q


def score_documents(query, documents: Sequence, scoring: str = "maxsim", normalize: bool = False) -> list[float]:
    """One query's vector against each document's, by `scoring` (module docstring: the scales)."""
    check_scoring(scoring)
    if not documents:
        return []
    if scoring == "cosine":
        return cosine_scores(query, documents).tolist()
    scores = late_interaction_scores(query, documents)
    return (scores / max(len(query), 1)).tolist() if normalize else scores.tolist()


@dataclass(frozen=True)
class RerankResult:
    """One document's place in a ranking: its position in the input and its score."""

    index: int
    score: float


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[RerankResult]:
    """Best first; equal scores keep input order. `top_n` (None: all) keeps the first ones."""
    check_top_n(top_n)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [RerankResult(i, float(scores[i])) for i in order[:top_n]]


def check_scoring(scoring) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")


def check_top_n(top_n) -> None:
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ValueError(f"top_n must be a positive integer or None, got {top_n!r}")


def rerank_tasks(task_routing: dict, task: str) -> tuple[str, str]:
    """A task name -> (the query's task, the documents' task): `retrieval` -> (`retrieval.query`,
    `retrieval.passage`); a task without sides (`text-matching`) is used for both."""
    if isinstance(task, str) and not task.endswith(SIDES):
        query, passage = f"{task}{SIDES[0]}", f"{task}{SIDES[1]}"
        if query in task_routing and passage in task_routing:
            return query, passage
        if task in task_routing:
            return task, task
    hint = ""
    if isinstance(task, str) and task.endswith(SIDES):
        hint = (f" (give it without its side, {task.rsplit('.', 1)[0]!r}: the query is encoded with the task's "
                "query side and the documents with its passage side)")
    known = sorted(t for t in task_routing if not t.endswith(SIDES))
    raise ValueError(f"unknown rerank task {task!r}{hint}; known: {', '.join(known)}")


def rerank_items(query, documents, query_task: str, passage_task: str, adapter: str | None) -> tuple[dict, list[dict]]:
    """The query and documents (strings, or objects with text/image/image_embeds and optional
    instructions/adapter) -> items on the query's and documents' tasks. Refuses an empty list of documents,
    an item naming its own task (the rerank's task decides both sides) and a documents string."""
    from .processing_nova_embeddings_v1 import item_error

    if isinstance(documents, (str, bytes, dict)) or not isinstance(documents, Sequence):
        raise ValueError(f"documents must be a list of strings or objects, not {type(documents).__name__}")
    if len(documents) == 0:
        raise ValueError("documents is empty: give at least one document to rank")

    def item(value, task: str, index: int | None) -> dict:
        if isinstance(value, str):
            value = {"text": value}
        elif not isinstance(value, dict):
            raise item_error(index, f"must be a string or an object with text/image, not {type(value).__name__}")
        if "task" in value:
            raise item_error(index, "'task' is set for the query and documents alike by the rerank's task",
                             field="task")
        out = {"task": task, **value}
        if adapter is not None and "adapter" not in out:
            out["adapter"] = adapter
        return out

    try:
        query_item = item(query, query_task, None)
    except ValueError as exc:
        raise ValueError(f"query: {exc}") from None
    return query_item, [item(d, passage_task, i) for i, d in enumerate(documents)]


def rerank(model, query, documents, *, task: str | None = "retrieval", instructions: str | None = None,
           adapter: str | None = None, scoring: str = "maxsim", normalize: bool = False,
           top_n: int | None = None, batch_size: int = 8, max_pixels: int | None = None,
           max_length: int | None = None) -> list[RerankResult]:
    """Rank `documents` against `query`: -> [RerankResult(index, score)], best first.

    The query is encoded once on the task's query side (`retrieval` -> `retrieval.query`), the documents
    (strings, or objects with text, image or both, as `encode()` takes them) on its passage side; scoring
    `maxsim` (default: late interaction over multi-vectors) or `cosine` (pooled vectors); scales in this
    module's docstring. `instructions` apply to the query and every document (an object's own
    `instructions` win); `adapter` None follows the task's routing, "none" is the base model, a name a loaded
    adapter (an object's own `adapter` wins). Bad input raises ValueError (`ItemError` naming a document)."""
    from .processing_nova_embeddings_v1 import ItemError

    check_scoring(scoring)
    check_top_n(top_n)
    query_task, passage_task = rerank_tasks(model.config.task_routing, task or model.config.default_task)
    query_item, document_items = rerank_items(query, documents, query_task, passage_task, adapter)
    multivector = scoring == "maxsim"
    try:
        query_row = model.processor.prepare_item(query_item, instructions=instructions, max_pixels=max_pixels,
                                                 max_length=max_length, fetch_urls=True)
    except ItemError as exc:
        raise ItemError(None, f"query: {exc}", exc.code, exc.field) from None
    (query_vector,) = model.embed_prepared([query_row], multivector)
    if isinstance(query_vector, ItemError):
        raise ItemError(None, f"query: {query_vector}", query_vector.code, query_vector.field)
    vectors = model.encode(document_items, instructions=instructions, return_multivector=multivector,
                           batch_size=batch_size, max_pixels=max_pixels, max_length=max_length)
    return ranked(score_documents(query_vector, vectors, scoring, normalize), top_n)


def _float32(vector) -> np.ndarray:
    return np.asarray(vector.detach().cpu() if isinstance(vector, torch.Tensor) else vector, dtype=np.float32)
