"""The OpenAPI 3.1 document served at `GET /openapi.json` (hand-written: the routes are few and stable)."""

from __future__ import annotations

from . import __version__

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}

_ITEM = {
    "type": "object",
    "description": "Nova / Jina item. At least one of text, image, image_embeds.",
    "properties": {
        "text": {"type": "string"},
        "image": {"type": "string", "description": "base64, data: URL, or http(s) URL (only with --allow-image-urls)"},
        "image_embeds": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "image_grid_thw": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
        "task": {"type": "string", "description": "retrieval, retrieval.query, retrieval.passage, text-matching, code, code.query, code.passage"},
        "adapter": {"type": ["string", "null"], "description": "adapter name, or 'none' for the base model"},
        "instructions": {"type": ["string", "null"], "description": "overrides the request-level instructions"},
    },
    "additionalProperties": False,
}

_REQUEST = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": "string"},
        "input": {
            "oneOf": [
                {"type": "string"},
                {"$ref": "#/components/schemas/Item"},
                {"type": "array", "items": {"oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Item"}]}},
            ]
        },
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "embedding_type": {"type": "string", "enum": ["float", "base64"], "description": "Jina alias of encoding_format"},
        "dimensions": {"type": "integer", "description": "matryoshka truncation (pooled vectors only)"},
        "user": {"type": "string"},
        "task": {"type": "string", "description": "request-level task (Jina form) for items without their own"},
        "instructions": {"type": "string", "description": "applied to every item without its own"},
        "return_multivector": {"type": "boolean"},
        "truncate": {"type": "boolean", "description": "truncate items over --max-input-tokens instead of 413"},
        "prompt_set": {"type": "string", "description": "alternative prompt set, e.g. 'descriptive'"},
    },
}

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


def _err(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def document(settings) -> dict:
    json_body = {"application/json": {"schema": {"type": "object"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nova Embeddings server", "version": __version__,
                 "description": f"serving {', '.join(settings.model_names())}"},
        "components": {
            "schemas": {"Error": _ERROR, "Item": _ITEM, "EmbeddingRequest": _REQUEST, "EmbeddingResponse": _RESPONSE},
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
            "/v1/models": {"get": {"summary": "Served model names and loaded adapters", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "models"}, **_err(401)}}},
            "/health": {"get": {"summary": "200 when ready, 503 while loading",
                                "responses": {"200": {"description": "ready"}, **_err(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
            "/v1/internal/lora": {"get": {"summary": "Loaded adapters (admin key)", "security": [{"bearer": []}],
                                          "responses": {"200": {"description": "adapters"}, **_err(401, 403, 404)}}},
            "/v1/internal/lora/load": {"post": {
                "summary": "Load a PEFT adapter from inside --lora-root (admin key)", "security": [{"bearer": []}],
                "requestBody": {"content": json_body},
                "responses": {"200": {"description": "loaded"}, **_err(400, 401, 403, 404)}}},
            "/v1/internal/lora/unload": {"post": {
                "summary": "Drain and unload an adapter (admin key)", "security": [{"bearer": []}],
                "requestBody": {"content": json_body},
                "responses": {"200": {"description": "unloaded"}, **_err(400, 401, 403, 404, 503)}}},
        },
    }
