"""text-embeddings-inference (TEI) routes, so TEI's clients work unchanged (huggingface_hub's InferenceClient,
LangChain's, Haystack's and LlamaIndex's TEI embedders): `POST /embed`, `POST /` (the same, what
`InferenceClient(base_url).feature_extraction` calls), `POST /embed_all`, `POST /rerank`, `POST /tokenize`,
`GET /info`.

Each route parses TEI's body into the same `EmbeddingRequest` (or rerank) as `/v1/embeddings`, so limits, keys,
metrics and batching are the same; answers are TEI's shapes, and so are errors: `{"error", "error_type"}` with
TEI's statuses (413 too large, 422 invalid, 429 overloaded, 424 backend, 503 unhealthy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from . import error_codes as codes
from .errors import ApiError, bad_request
from .pipeline import ClientGone, counted_refusals, embed_request
from .rerank import RerankQuery, rank, rerank_items, rerank_sides
from .schemas import EmbeddingRequest, parse_item
from .state import ServerState

_INPUTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_TRUNCATION = {"type": "string", "enum": ["Right"], "description": "only Right (text is cut at its end)"}
_PROMPT = {"type": "string", "description": "a task of the model (retrieval.passage), or query / passage: that "
                                             "side of the default task"}
EMBED_FIELDS: dict[str, dict] = {
    "inputs": _INPUTS,
    "normalize": {"type": "boolean", "default": True, "description": "only true (vectors are always L2-normalized)"},
    "truncate": {"type": "boolean", "default": False},
    "truncation_direction": _TRUNCATION,
    "prompt_name": _PROMPT,
    "dimensions": {"type": "integer", "description": "matryoshka truncation"},
}
EMBED_ALL_FIELDS = {key: EMBED_FIELDS[key] for key in ("inputs", "truncate", "truncation_direction", "prompt_name")}
TOKENIZE_FIELDS: dict[str, dict] = {
    "inputs": _INPUTS,
    "add_special_tokens": {"type": "boolean", "default": True, "description": "only true: the model's own tokens"},
    "prompt_name": _PROMPT,
}
RERANK_FIELDS: dict[str, dict] = {
    "query": {"type": "string"},
    "texts": {"type": "array", "items": {"type": "string"}},
    "raw_scores": {"type": "boolean", "default": False,
                   "description": "false: MaxSim / query tokens, in [-1, 1]; true: MaxSim summed over query tokens"},
    "return_text": {"type": "boolean", "default": False},
    "truncate": {"type": "boolean", "default": False},
    "truncation_direction": _TRUNCATION,
}
PATHS = ("/embed", "/", "/embed_all", "/rerank", "/tokenize", "/info")
# OpenAI-shape status -> TEI's status and error_type.
_TEI_ERRORS = {400: (422, "Validation"), 404: (422, "Validation"), 413: (413, "Validation"),
               422: (422, "Validation"), 429: (429, "Overloaded"), 401: (401, "Unauthorized"),
               403: (403, "Unauthorized")}


def tei_error(exc: ApiError) -> JSONResponse:
    status, kind = _TEI_ERRORS.get(exc.status, (503, "Unhealthy") if exc.status == 503 else (424, "Backend"))
    if exc.status == 503 and exc.code in (codes.SHUTTING_DOWN, codes.TOO_MANY_REQUESTS):
        kind = "Overloaded"
    return JSONResponse({"error": exc.message, "error_type": kind}, status_code=status, headers=exc.headers)


@dataclass
class TeiInputs:
    """TEI's `inputs` and options, parsed: the items on the task the prompt names."""

    items: list[dict]
    truncate: bool
    single: bool  # `inputs` was one string


def task_for_prompt(server: ServerState, prompt_name) -> str:
    """TEI's prompt_name -> a task: None the server's default, `query`/`passage` that side of the default task,
    or a task's own name."""
    if prompt_name is None:
        return server.default_task
    if not isinstance(prompt_name, str):
        raise bad_request("'prompt_name' must be a string", param="prompt_name")
    if prompt_name in ("query", "passage"):
        return rerank_sides(server, None)[0 if prompt_name == "query" else 1]
    if prompt_name in server.known_tasks:
        return prompt_name
    raise bad_request(f"unknown prompt_name {prompt_name!r}; known: query, passage, "
                      f"{', '.join(sorted(server.known_tasks))}", param="prompt_name")


def parse_inputs(server: ServerState, payload: dict) -> TeiInputs:
    raw = payload.get("inputs")
    single = isinstance(raw, str)
    values = [raw] if single else raw
    if not isinstance(values, list) or not values:
        raise bad_request("'inputs' must be a string or a non-empty list of strings", param="inputs")
    limit = server.settings.max_client_batch_size
    if len(values) > limit:
        raise ApiError(413, f"batch size {len(values)} > maximum allowed batch size {limit} "
                       "(--max-client-batch-size)", param="inputs", code=codes.TOO_MANY_INPUTS)
    task = task_for_prompt(server, payload.get("prompt_name"))
    forms: set[str] = set()
    items = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise bad_request(f"item {i}: must be a string (token ids are not supported)", param=f"inputs[{i}]")
        items.append(parse_item(value, i, task, server.known_tasks, forms, field="inputs"))
    return TeiInputs(items, _flag(payload, "truncate", False), single)


def _flag(payload: dict, key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", param=key)
    return value


def _check_supported(payload: dict) -> None:
    """Options TEI has that this server cannot honour: refused, never silently ignored."""
    if payload.get("truncation_direction") not in (None, "Right", "right"):
        raise bad_request("truncation_direction: only 'Right' is supported", param="truncation_direction")
    if _flag(payload, "normalize", True) is False:
        raise bad_request("'normalize': false is not supported: this server's vectors are always L2-normalized",
                          param="normalize")
    if _flag(payload, "add_special_tokens", True) is False:
        raise bad_request("'add_special_tokens': false is not supported: the tokens are the model's own",
                          param="add_special_tokens")


async def _vectors(server: ServerState, request: Request, inputs: TeiInputs, *, multivector: bool,
                   dimensions=None) -> list:
    with counted_refusals(server):
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or dimensions < 1):
            raise bad_request("'dimensions' must be a positive integer", param="dimensions")
    req = EmbeddingRequest(model=None, items=inputs.items, return_multivector=multivector, dimensions=dimensions,
                           truncate=inputs.truncate, forms={"tei"})
    result = await embed_request(server, request, req)
    return [vector.tolist() for vector in result.vectors]


# ---------------------------------------------------------------------- routes


def tei_routes(server: ServerState, *, require_api_key, read_json_object) -> list[Route]:
    """`require_api_key(server, request)`, `read_json_object(server, request, fields)`: routes.py's."""

    def route(path: str, fields: dict | None, answer):
        async def handler(request: Request) -> Response:
            try:
                require_api_key(server, request)
                server.require_ready()
                if fields is None:
                    return JSONResponse(answer(None, None))
                with server.slots.hold(server.batcher.retry_after):
                    payload = await read_json_object(server, request, fields)
                    with counted_refusals(server):
                        _check_supported(payload)
                    body = await answer(request, payload)
            except ApiError as exc:
                return tei_error(exc)
            except ClientGone:
                return Response(status_code=499)
            return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), media_type="application/json")

        return Route(path, handler, methods=["GET" if fields is None else "POST"])

    async def embed(request, payload):
        with counted_refusals(server):
            inputs = parse_inputs(server, payload)
        return await _vectors(server, request, inputs, multivector=False, dimensions=payload.get("dimensions"))

    async def embed_all(request, payload):
        with counted_refusals(server):
            inputs = parse_inputs(server, payload)
        return await _vectors(server, request, inputs, multivector=True)

    async def rerank(request, payload):
        texts = payload.get("texts")
        with counted_refusals(server):
            if not isinstance(payload.get("query"), str):
                raise bad_request("'query' must be a string", param="query")
            if isinstance(texts, list) and any(not isinstance(t, str) for t in texts):
                raise bad_request("'texts' must be a list of strings", param="texts")
            query, documents = rerank_items(server, payload["query"], texts, task=None, adapter=None,
                                            documents_field="texts")
            raw_scores, truncate = _flag(payload, "raw_scores", False), _flag(payload, "truncate", False)
            return_text = _flag(payload, "return_text", False)
        ranking = await rank(server, request, RerankQuery(
            model=None, query=query, documents=documents, sent_documents=texts, normalize=not raw_scores,
            truncate=truncate, documents_field="texts"))
        return [{"index": r.index, "score": r.score, **({"text": texts[r.index]} if return_text else {})}
                for r in ranking.results]

    async def tokenize(request, payload):
        with counted_refusals(server):
            inputs = parse_inputs(server, payload)
            return [tokens(server, item) for item in inputs.items]

    def info(_request, _payload):
        s = server.settings
        return {"model_id": s.primary_model_name, "model_sha": None, "model_dtype": s.dtype,
                "model_type": {"embedding": {"pooling": "mean"}}, "max_concurrent_requests": s.max_concurrent_requests,
                "max_input_length": s.max_input_tokens, "max_batch_tokens": s.max_batch_tokens,
                "max_batch_requests": s.max_batch_size, "max_client_batch_size": s.max_client_batch_size,
                "max_rerank_documents": s.max_rerank_documents, "tokenization_workers": s.preprocess_workers,
                "version": __version__, "sha": None, "docker_label": None,
                "multi_vector_dim": server.model.config.multi_vector_projector_dim}

    return [route("/embed", EMBED_FIELDS, embed), route("/", EMBED_FIELDS, embed),
            route("/embed_all", EMBED_ALL_FIELDS, embed_all), route("/rerank", RERANK_FIELDS, rerank),
            route("/tokenize", TOKENIZE_FIELDS, tokenize), route("/info", None, info)]


def tokens(server: ServerState, item: dict) -> list[dict]:
    """TEI's tokens of one item, as the model sees it (its task prompt included): id, text, special, and the
    [start, stop) characters of `prompt + text` it covers (null where a token is part of a character)."""
    processor = server.model.processor
    try:
        prepared = processor.prepare_item(item, allow_paths=False)
    except ValueError as exc:
        raise bad_request(str(exc), param="inputs") from None
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids)
    ids = prepared.input_ids
    rendered = tokenizer.decode(ids)
    out, position = [], 0
    for k, token_id in enumerate(ids):
        piece = tokenizer.decode([token_id])
        if rendered.startswith(piece, position) and "\ufffd" not in piece:
            start, position = position, position + len(piece)
        else:  # a token holding part of a character: where the text stands after it
            start, position = None, len(tokenizer.decode(ids[: k + 1]))
        out.append({"id": token_id, "text": piece, "special": token_id in special, "start": start,
                    "stop": None if start is None else position})
    return out

