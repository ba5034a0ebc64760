"""The OpenAPI 3.1 document served at `GET /openapi.json` (hand-written: the routes are few and stable)."""

from __future__ import annotations

from . import __version__
from .error_codes import ERROR_CODES
from .rerank import RERANK_FIELDS
from .schemas import ITEM_FIELDS, LORA_LOAD_FIELDS, LORA_UNLOAD_FIELDS, REQUEST_FIELDS

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"], "enum": [*ERROR_CODES, None],
                         "description": "; ".join(f"{name} ({code.status}): {code.meaning}"
                                                  for name, code in ERROR_CODES.items())},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}

_ITEM = {
    "type": "object",
    "description": "Nova / Jina item. At least one of text, image, image_embeds.",
    "properties": ITEM_FIELDS,
    "additionalProperties": False,
}

_REQUEST = {"type": "object", "required": ["input"], "properties": REQUEST_FIELDS, "additionalProperties": False}


def _body(fields: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": list(fields), "properties": fields, "additionalProperties": False}}}}


_RESPONSE = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                            {"type": "string", "description": "base64 little-endian float32"},
                        ]
                    },
                    "shape": {"type": "array", "items": {"type": "integer"}, "description": "multi-vector base64 only"},
                    "truncated": {"type": "boolean"},
                },
            },
        },
        "usage": {
            "type": "object",
            "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
        },
    },
}


_RERANK_REQUEST = {"type": "object", "required": ["query", "documents"], "properties": RERANK_FIELDS,
                   "additionalProperties": False}
_RERANK_RESPONSE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "list"},
        "model": {"type": "string"},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"},
            "relevance_score": {"type": "number", "description": "summed MaxSim, or cosine, or MaxSim / n_q"},
            "document": {"type": "object"}}}},
        "usage": {"type": "object",
                  "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
    },
}


def _rerank_path() -> dict:
    return {"post": {
        "summary": "Rank documents against a query by late interaction (MaxSim) or pooled cosine (Jina/Cohere shape)",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RerankRequest"}}}},
        "responses": {"200": {"description": "results, best first", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RerankResponse"}}}},
            **_err(400, 401, 404, 413, 429, 503)},
    }}


def _err(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def document(settings) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nova Embeddings server", "version": __version__,
                 "description": f"serving {', '.join(settings.model_names())}"},
        "components": {
            "schemas": {"Error": _ERROR, "Item": _ITEM, "EmbeddingRequest": _REQUEST, "EmbeddingResponse": _RESPONSE,
                        "RerankRequest": _RERANK_REQUEST, "RerankResponse": _RERANK_RESPONSE},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/embeddings": {"post": {
                "summary": "Create embeddings (OpenAI, Jina and Nova request forms)",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}},
                "responses": {"200": {"description": "embeddings", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingResponse"}}}},
                    **_err(400, 401, 404, 413, 429, 503)},
            }},
            "/v1/rerank": _rerank_path(),
            "/v2/rerank": _rerank_path(),
            "/v1/models": {"get": {"summary": "Served model names and loaded adapters", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "models"}, **_err(401)}}},
            "/health": {"get": {"summary": "200 when ready, 503 while loading",
                                "responses": {"200": {"description": "ready"}, **_err(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
            "/v1/internal/lora": {"get": {"summary": "Loaded adapters (admin key)", "security": [{"bearer": []}],
                                          "responses": {"200": {"description": "adapters"}, **_err(401, 403, 404)}}},
            "/v1/internal/lora/load": {"post": {
                "summary": "Load a PEFT adapter from inside --lora-root (admin key)", "security": [{"bearer": []}],
                "requestBody": _body(LORA_LOAD_FIELDS),
                "responses": {"200": {"description": "loaded"}, **_err(400, 401, 403, 404)}}},
            "/v1/internal/lora/unload": {"post": {
                "summary": "Drain and unload an adapter (admin key)", "security": [{"bearer": []}],
                "requestBody": _body(LORA_UNLOAD_FIELDS),
                "responses": {"200": {"description": "unloaded"}, **_err(400, 401, 403, 404, 503)}}},
        },
    }
