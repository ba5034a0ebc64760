"""`POST /v1/embeddings` request parsing: three request forms -> one validated `EmbeddingRequest`.

- OpenAI: `input` is a string or a list of strings; `encoding_format`, `dimensions`, `user`.
- Jina API: request-level `task`, `input` objects with `text` or `image`, `dimensions`,
  `return_multivector` (`embedding_type` is read as `encoding_format`, `truncate` as auto-truncation;
  `late_chunking` may only be false and `normalized` only true, as this server can only do that).
- Nova: per-item objects `{task, adapter, text, image, image_embeds, instructions}`, request-level
  `instructions`, `return_multivector`, `dimensions`, `prompt_set`.

The three forms are one grammar (strings and objects can be mixed in one list), so a request is never
rejected for mixing them. A field none of them has is refused (with a "did you mean" for a near miss).
Every refusal names the offending field in `param` (`input[3].image`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inputs_nova_embeddings_v1 import ITEM_FIELDS, InputRefused, check_item, unknown_fields_message

from . import error_codes as codes
from .errors import ApiError, bad_request

# The fields of each JSON body, with their OpenAPI schemas: the parsers refuse any other field (a typo never
# passes silently) and /openapi.json publishes these, so what is documented is what is accepted.
ITEM_KEYS = frozenset(ITEM_FIELDS)
ENCODING_FORMATS = ("float", "base64")
_FORMAT = {"type": "string", "enum": list(ENCODING_FORMATS)}
REQUEST_FIELDS: dict[str, dict] = {
    # OpenAI (what its SDK sends; Nova fields travel in its extra_body)
    "model": {"type": "string"},
    "input": {"oneOf": [
        {"type": "string"},
        {"$ref": "#/components/schemas/Item"},
        {"type": "array", "items": {"oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Item"}]}},
    ]},
    "encoding_format": {**_FORMAT, "default": "float"},
    "dimensions": {"type": "integer", "description": "matryoshka truncation (pooled vectors only)"},
    "user": {"type": "string"},
    # Jina API
    "task": {"type": "string", "description": "request-level task (Jina form) for items without their own"},
    "embedding_type": {**_FORMAT, "description": "Jina alias of encoding_format"},
    "truncate": {"type": "boolean", "description": "truncate items over --max-input-tokens instead of 413"},
    "late_chunking": {"type": "boolean", "description": "Jina API field; only false (late chunking is not supported)"},
    "normalized": {"type": "boolean", "description": "Jina API field; only true (vectors are always L2-normalized)"},
    "return_multivector": {"type": "boolean"},
    # Nova
    "instructions": {"type": "string", "description": "applied to every item without its own"},
    "prompt_set": {"type": "string", "description": "alternative prompt set, e.g. 'descriptive'"},
}
LORA_LOAD_FIELDS: dict[str, dict] = {
    "lora_name": {"type": "string", "description": "the name requests select it by ('model' or an item's 'adapter')"},
    "lora_path": {"type": "string", "description": "a PEFT folder (or its adapter_model.safetensors) inside "
                                                   "--lora-root; relative paths are relative to it"},
}
LORA_UNLOAD_FIELDS: dict[str, dict] = {"lora_name": LORA_LOAD_FIELDS["lora_name"]}


def refuse_unknown_fields(payload: dict, known, *, where: str = "", prefix: str = "") -> None:
    """A 400 naming every field of `payload` outside `known` (OpenAI refuses unrecognized arguments too), with a
    "did you mean" for near misses, so that `"dimension": 32` is never read as "no truncation asked for".
    `where` prefixes the param (`input[3].`), `prefix` the message (`item 3: `)."""
    message = unknown_fields_message(payload, known)
    if message:
        first = next(key for key in payload if key not in known)
        raise bad_request(prefix + message, param=f"{where}{first}", code=codes.UNKNOWN_FIELD)


@dataclass
class EmbeddingRequest:
    model: str | None
    items: list[dict]
    instructions: str | None = None
    return_multivector: bool = False
    dimensions: int | None = None
    encoding_format: str = "float"
    truncate: bool | None = None
    user: str | None = None
    prompt_set: str | None = None
    forms: set[str] = field(default_factory=set)
    model_label: str = ""  # the name echoed in the response's `model`


def _opt_str(payload: dict, key: str, param: str | None = None) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string", param=param or key)
    return value


def _opt_bool(payload: dict, key: str) -> bool | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", param=key)
    return value


def parse_embedding_request(
    payload: object,
    *,
    default_task: str,
    default_multivector: bool,
    max_items: int,
    known_tasks: frozenset[str] | None = None,
) -> EmbeddingRequest:
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", code=codes.INVALID_JSON)
    refuse_unknown_fields(payload, REQUEST_FIELDS)

    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")

    encoding = payload.get("encoding_format")
    if encoding is None:
        encoding = payload.get("embedding_type")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise bad_request(f"'encoding_format' must be one of {list(ENCODING_FORMATS)}", param="encoding_format")

    dimensions = payload.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or dimensions <= 0):
        raise bad_request("'dimensions' must be a positive integer", param="dimensions")

    multivector = _opt_bool(payload, "return_multivector")
    truncate = _opt_bool(payload, "truncate")
    if payload.get("late_chunking"):
        raise bad_request("late_chunking is not supported by this server", param="late_chunking")
    if _opt_bool(payload, "normalized") is False:
        raise bad_request("'normalized': false is not supported: this server's vectors are always L2-normalized",
                          param="normalized")
    instructions = _opt_str(payload, "instructions")
    user = _opt_str(payload, "user")
    prompt_set = _opt_str(payload, "prompt_set")
    task = _opt_str(payload, "task")
    if task is not None and known_tasks is not None and task not in known_tasks:
        raise bad_request(f"unknown task {task!r}; known tasks: {', '.join(sorted(known_tasks))}", param="task")
    request_task = task or default_task

    if "input" not in payload or payload["input"] is None:
        raise bad_request("'input' is required", param="input")
    raw = payload["input"]
    forms: set[str] = set()
    if isinstance(raw, (str, dict)):
        raw_items = [raw]
    elif isinstance(raw, list):
        raw_items = raw
    else:
        raise bad_request("'input' must be a string, an object, or a list of strings/objects", param="input")
    if not raw_items:
        raise bad_request("'input' must not be empty", param="input")
    if raw_items and all(isinstance(x, int) and not isinstance(x, bool) for x in raw_items):
        raise bad_request("token-id input is not supported; send text", param="input")
    if len(raw_items) > max_items:
        raise ApiError(
            413, f"{len(raw_items)} inputs in one request, over the limit of {max_items} "
            "(--max-client-batch-size)", param="input", code=codes.TOO_MANY_INPUTS,
        )

    items: list[dict] = []
    for i, raw_item in enumerate(raw_items):
        items.append(parse_item(raw_item, i, request_task, known_tasks, forms))
    if task is not None:
        forms.add("jina")
    if instructions is not None or multivector is not None:
        forms.add("nova")

    return EmbeddingRequest(
        model=model,
        items=items,
        instructions=instructions if instructions else None,
        return_multivector=default_multivector if multivector is None else multivector,
        dimensions=dimensions,
        encoding_format=encoding,
        truncate=truncate,
        user=user,
        prompt_set=prompt_set,
        forms=forms or {"openai"},
    )


def parse_item(raw: object, i: int | None, request_task: str, known_tasks, forms: set[str], *,
               field: str = "input") -> dict:
    """One item (a string or an object) -> the item dict the model takes; a 400 naming it (`param`
    `{field}[i].key`, message `item i: ...`; `i` None: a lone item such as a rerank's query, `{field}.key`)."""
    where = field if i is None else f"{field}[{i}]"
    prefix = f"{field}: " if i is None else f"item {i}: "
    if isinstance(raw, str):
        if not raw:
            raise bad_request(f"{prefix}text is empty", param=where)
        forms.add("openai")
        return {"task": request_task, "text": raw}
    if isinstance(raw, list):
        raise bad_request(f"{prefix}token-id input is not supported; send text", param=where)
    if not isinstance(raw, dict):
        raise bad_request(f"{prefix}must be a string or an object", param=where)
    refuse_unknown_fields(raw, ITEM_FIELDS, where=f"{where}.", prefix=prefix)
    item: dict = {}
    task = raw.get("task")
    if task is not None:
        if not isinstance(task, str):
            raise bad_request(f"{prefix}'task' must be a string", param=f"{where}.task")
        if known_tasks is not None and task not in known_tasks:
            raise bad_request(f"{prefix}unknown task {task!r}; known tasks: {', '.join(sorted(known_tasks))}",
                              param=f"{where}.task")
        forms.add("nova")
    item["task"] = task or request_task
    for key in ("text", "image", "adapter", "instructions"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad_request(f"{prefix}'{key}' must be a string", param=f"{where}.{key}")
        if key == "image" and not value:
            raise bad_request(f"{prefix}'image' is empty", param=f"{where}.image")
        item[key] = value
    if "instructions" in raw:
        item["instructions"] = raw["instructions"] or None  # explicit null/"" overrides request-level
        forms.add("nova")
    if "adapter" in raw:
        forms.add("nova")
    if raw.get("image_embeds") is not None:
        item["image_embeds"] = _parse_image_embeds(raw["image_embeds"], prefix, where)
        grid = raw.get("image_grid_thw")
        if not (isinstance(grid, list) and len(grid) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid)):
            raise bad_request(f"{prefix}'image_embeds' needs 'image_grid_thw': [t, h, w] (positive integers)",
                              param=f"{where}.image_grid_thw")
        item["image_grid_thw"] = grid
        forms.add("nova")
    elif raw.get("image_grid_thw") is not None:
        raise bad_request(f"{prefix}'image_grid_thw' only goes with 'image_embeds'", param=f"{where}.image_grid_thw")
    try:
        check_item(item)
    except InputRefused as exc:
        raise bad_request(f"{prefix}{exc}", param=f"{where}.{exc.field}" if exc.field else where) from None
    return item


def _parse_image_embeds(value: object, prefix: str, where: str):
    if not isinstance(value, list) or not value:
        raise bad_request(f"{prefix}'image_embeds' must be a non-empty list of equal-length number lists",
                          param=f"{where}.image_embeds")
    width = None
    for row in value:
        if not isinstance(row, list) or not row or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in row
        ):
            raise bad_request(f"{prefix}'image_embeds' must be a list of number lists",
                              param=f"{where}.image_embeds")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise bad_request(f"{prefix}'image_embeds' rows differ in length", param=f"{where}.image_embeds")
    return value
