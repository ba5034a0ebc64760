"""Reranking in the server: `POST /v1/rerank` (and `/v2/rerank`), the shape Jina's and Cohere's rerank APIs share,
and the ranking TEI's `POST /rerank` (serve/tei.py) shares with it.

A rerank is ONE `EmbeddingRequest` through the embedding pipeline (pipeline.py): the documents, then the query
(last, so that a row error's `input[i]` is document i), each on its side of the task (`retrieval`: documents as
`retrieval.passage`, the query as `retrieval.query`), so the query is encoded once and the documents are batched
with every other client's rows. Their vectors are scored here by the remote code's scoring module (the MaxSim
`model.rerank()` uses; pooled cosine on request) and only scores leave the server. Scales: docs/reranking.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nova.repo import model_class

from . import error_codes as codes
from .errors import ApiError, bad_request, request_id_var
from .pipeline import ClientGone, counted_refusals, embed_request
from .schemas import EmbeddingRequest, parse_item, refuse_unknown_fields
from .state import ServerState

_DOCUMENT = {"oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Item"}]}
RERANK_FIELDS: dict[str, dict] = {
    "model": {"type": "string"},
    "query": {**_DOCUMENT, "description": "a string, or an item object (text, image or both)"},
    "documents": {"type": "array", "items": _DOCUMENT,
                  "description": "strings or item objects without 'task'; at most --max-rerank-documents"},
    "top_n": {"type": "integer", "description": "return the best N (default: all)"},
    "return_documents": {"type": "boolean", "description": "echo each document in its result (default true)"},
    "task": {"type": "string", "description": "retrieval (default), code or text-matching: the query is encoded "
                                              "on its query side, the documents on its passage side"},
    "instructions": {"type": "string", "description": "applied to the query and every document without its own"},
    "adapter": {"type": "string", "description": "adapter for items without their own; 'none': the base model"},
    "scoring": {"type": "string", "enum": ["maxsim", "cosine"], "default": "maxsim",
                "description": "late interaction (MaxSim over multi-vectors) or pooled cosine"},
    "normalize": {"type": "boolean", "default": False,
                  "description": "MaxSim divided by the query's token count, in [-1, 1]"},
    "truncate": {"type": "boolean", "description": "truncate items over --max-input-tokens instead of 413"},
}
# Documents scored in the worker pool above this many vector values (large image multi-vectors), on the event
# loop below it (a hundred short passages score in well under a millisecond).
SCORE_INLINE_VALUES = 1 << 18
_INPUT_PARAM = re.compile(r"^input\[(\d+)\]")
# The remote code's scoring functions, looked up once (a lookup checks the module's files: milliseconds).
scoring = functools.cache(model_class)


@dataclass
class RerankQuery:
    """A parsed rerank request, whichever route it came by."""

    model: str | None
    query: dict  # the query's item, on the task's query side
    documents: list[dict]  # the documents' items, on its passage side
    sent_documents: list  # the documents as the client sent them (echoed with return_documents)
    scoring: str = "maxsim"
    normalize: bool = False
    top_n: int | None = None
    instructions: str | None = None
    truncate: bool | None = None
    documents_field: str = "documents"  # how errors name a document: documents[3] (texts[3] on TEI's route)
    query_field: str = "query"


@dataclass
class Ranking:
    results: list  # the scoring module's RerankResult(index, score), best first
    tokens: int
    model_label: str


def rerank_sides(server: ServerState, task: str | None) -> tuple[str, str]:
    """(query task, documents task) for a request's task; default: the server's default task without its side."""
    task = task or re.sub(r"\.(query|passage)$", "", server.default_task)
    try:
        return scoring("rerank_tasks")(server.model.config.task_routing, task)
    except ValueError as exc:
        raise bad_request(str(exc), param="task") from None


def rerank_items(server: ServerState, raw_query, raw_documents, *, task: str | None, adapter: str | None,
                 documents_field: str = "documents", query_field: str = "query") -> tuple[dict, list[dict]]:
    """The query and documents as the pipeline's items (schemas.parse_item's rules), each on its side of the task;
    refuses no documents, more than --max-rerank-documents (413) and a document naming its own task."""
    query_task, passage_task = rerank_sides(server, task)
    if not isinstance(raw_documents, list) or not raw_documents:
        what = "a list" if not isinstance(raw_documents, list) else "at least one document"
        raise bad_request(f"'{documents_field}' must be {what} (strings or objects)", param=documents_field)
    limit = server.settings.max_rerank_documents
    if len(raw_documents) > limit:
        raise ApiError(413, f"{len(raw_documents)} documents in one request, over the limit of {limit} "
                       "(--max-rerank-documents)", param=documents_field, code=codes.TOO_MANY_DOCUMENTS)
    forms: set[str] = set()
    known = server.known_tasks
    if raw_query is None:
        raise bad_request(f"'{query_field}' is required", param=query_field)
    if isinstance(raw_query, dict) and "task" in raw_query:
        raise bad_request(f"{query_field}: 'task' is set by the request's 'task'", param=f"{query_field}.task")
    query = _with_adapter(parse_item(raw_query, None, query_task, known, forms, field=query_field), adapter)
    documents = []
    for i, raw in enumerate(raw_documents):
        if isinstance(raw, dict) and "task" in raw:
            raise bad_request(f"item {i}: 'task' is set for the query and documents alike by the request's 'task'",
                              param=f"{documents_field}[{i}].task")
        documents.append(_with_adapter(parse_item(raw, i, passage_task, known, forms, field=documents_field),
                                       adapter))
    return query, documents


def _with_adapter(item: dict, adapter: str | None) -> dict:
    return item if adapter is None or "adapter" in item else {**item, "adapter": adapter}


async def rank(server: ServerState, request: Request, query: RerankQuery) -> Ranking:
    """Embed the documents and the query in one pipeline request, score, sort. Raises ApiError (a row's error
    names its document or the query) or ClientGone."""
    multivector = query.scoring == "maxsim"
    req = EmbeddingRequest(model=query.model, items=[*query.documents, query.query], instructions=query.instructions,
                           return_multivector=multivector, truncate=query.truncate, forms={"rerank"})
    try:
        result = await embed_request(server, request, req)
    except ApiError as exc:
        raise _renamed(exc, query) from None
    *document_vectors, query_vector = result.vectors
    score = scoring("score_documents")
    if sum(v.size for v in document_vectors) <= SCORE_INLINE_VALUES:
        scores = score(query_vector, document_vectors, query.scoring, query.normalize)
    else:
        scores = await asyncio.get_running_loop().run_in_executor(
            server.preparer.pool, score, query_vector, document_vectors, query.scoring, query.normalize)
    return Ranking(scoring("ranked")(scores, query.top_n), result.tokens, req.model_label)


def _renamed(exc: ApiError, query: RerankQuery) -> ApiError:
    """A row's error from the pipeline names `input[i]`: document i, or the query (the last item)."""
    match = _INPUT_PARAM.match(exc.param or "")
    if match is None:
        return exc
    index = int(match[1])
    if index < len(query.documents):
        exc.param = f"{query.documents_field}[{index}]" + exc.param[match.end():]
        return exc
    exc.param = query.query_field + exc.param[match.end():]
    exc.message = re.sub(rf"^item {index}: ", f"{query.query_field}: ", exc.message)
    exc.args = (exc.message,)
    return exc


# ---------------------------------------------------------------------- POST /v1/rerank


def parse_rerank_request(server: ServerState, payload) -> tuple[RerankQuery, bool]:
    """A /v1/rerank body -> (the query, return_documents)."""
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", code=codes.INVALID_JSON)
    refuse_unknown_fields(payload, RERANK_FIELDS)
    strings = {key: _typed(payload, key, str, "a string") for key in ("model", "task", "instructions", "adapter")}
    flags = {key: _typed(payload, key, bool, "true or false") for key in ("return_documents", "normalize", "truncate")}
    scoring = _typed(payload, "scoring", str, "a string") or "maxsim"
    if scoring not in ("maxsim", "cosine"):
        raise bad_request(f"'scoring' must be 'maxsim' or 'cosine', not {scoring!r}", param="scoring")
    top_n = payload.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise bad_request("'top_n' must be a positive integer", param="top_n")
    query, documents = rerank_items(server, payload.get("query"), payload.get("documents"), task=strings["task"],
                                    adapter=strings["adapter"])
    parsed = RerankQuery(model=strings["model"], query=query, documents=documents, sent_documents=payload["documents"],
                         scoring=scoring, normalize=bool(flags["normalize"]), top_n=top_n,
                         instructions=strings["instructions"] or None, truncate=flags["truncate"])
    return parsed, flags["return_documents"] is not False


def _typed(payload: dict, key: str, kind: type, name: str):
    value = payload.get(key)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"'{key}' must be {name}", param=key)
    return value


def echoed(document) -> dict:
    """A document as a result carries it: {"text": ...} for a string, the object as sent otherwise."""
    return {"text": document} if isinstance(document, str) else document


async def rerank_route(server: ServerState, request: Request, require_api_key, read_json) -> Response:
    require_api_key(server, request)
    server.require_ready()
    with server.slots.hold(server.batcher.retry_after):
        payload = await read_json(server, request)
        with counted_refusals(server):
            query, return_documents = parse_rerank_request(server, payload)
        try:
            ranking = await rank(server, request, query)
        except ClientGone:
            return Response(status_code=499)
    results = []
    for result in ranking.results:
        entry = {"index": result.index, "relevance_score": result.score}
        if return_documents:
            entry["document"] = echoed(query.sent_documents[result.index])
        results.append(entry)
    body = {"id": request_id_var.get(), "object": "list", "model": ranking.model_label, "results": results,
            "usage": {"prompt_tokens": ranking.tokens, "total_tokens": ranking.tokens}}
    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), media_type="application/json")


def rerank_routes(server: ServerState, *, require_api_key, read_json) -> list[Route]:
    """`require_api_key(server, request)` and `read_json(server, request)`: routes.py's (which imports this)."""
    async def handler(request: Request) -> Response:
        return await rerank_route(server, request, require_api_key, read_json)

    return [Route("/v1/rerank", handler, methods=["POST"]), Route("/v2/rerank", handler, methods=["POST"])]
