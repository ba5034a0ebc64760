"""Every error `code` the server answers with (the `code` of OpenAI's error shape), defined once, with the HTTP
status it goes with and what it means. Call sites name the constants; `/openapi.json` publishes the table.

The item codes (`INVALID_INPUT` ... `NON_FINITE_EMBEDDING`) are the model's own (`ItemError.code`, raised by the
processor and the forward); they are listed here for their statuses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    status: int
    meaning: str


# request and body
INVALID_REQUEST = "invalid_request"
INVALID_JSON = "invalid_json"
UNKNOWN_FIELD = "unknown_field"
TOO_MANY_INPUTS = "too_many_inputs"
TOO_MANY_DOCUMENTS = "too_many_documents"
INPUT_TOO_LONG = "input_too_long"
PAYLOAD_TOO_LARGE = "payload_too_large"
CLIENT_DISCONNECTED = "client_disconnected"
MODEL_NOT_FOUND = "model_not_found"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
# items (the model's ItemError codes)
INVALID_INPUT = "invalid_input"
INVALID_IMAGE = "invalid_image"
IMAGE_TOO_LARGE = "image_too_large"
ADAPTER_NOT_FOUND = "adapter_not_found"
NON_FINITE_EMBEDDING = "non_finite_embedding"
# images from clients
IMAGE_SOURCE_REFUSED = "image_source_refused"
IMAGE_URL_REFUSED = "image_url_refused"
IMAGE_URL_FAILED = "image_url_failed"
IMAGE_URL_TIMEOUT = "image_url_timeout"
# keys
INVALID_API_KEY = "invalid_api_key"
ADMIN_DISABLED = "admin_disabled"
# load
TOO_MANY_REQUESTS = "too_many_requests"
QUEUE_FULL = "queue_full"
# adapters at run time
LORA_DISABLED = "lora_disabled"
LORA_ROOT_NOT_SET = "lora_root_not_set"
LORA_PATH_OUTSIDE_ROOT = "lora_path_outside_root"
LORA_PATH_NOT_FOUND = "lora_path_not_found"
INVALID_ADAPTER = "invalid_adapter"
ADAPTER_EXISTS = "adapter_exists"
DRAIN_TIMEOUT = "drain_timeout"
ADAPTER_APPLY_TIMEOUT = "adapter_apply_timeout"
# the server's state
MODEL_LOADING = "model_loading"
MODEL_LOAD_FAILED = "model_load_failed"
MODEL_PROCESS_EXITED = "model_process_exited"
INVALID_DEFAULT_TASK = "invalid_default_task"
SHUTTING_DOWN = "shutting_down"
INTERNAL_ERROR = "internal_error"

ERROR_CODES: dict[str, ErrorCode] = {
    INVALID_REQUEST: ErrorCode(400, "a request field has a wrong value or type"),
    INVALID_JSON: ErrorCode(400, "the body is not JSON, or not a JSON object"),
    UNKNOWN_FIELD: ErrorCode(400, "a field the route does not know (with a 'did you mean' for a near miss)"),
    TOO_MANY_INPUTS: ErrorCode(413, "more items than --max-client-batch-size"),
    TOO_MANY_DOCUMENTS: ErrorCode(413, "more rerank documents than --max-rerank-documents"),
    INPUT_TOO_LONG: ErrorCode(413, "an item over --max-input-tokens, without truncation"),
    PAYLOAD_TOO_LARGE: ErrorCode(413, "a body over --payload-limit"),
    CLIENT_DISCONNECTED: ErrorCode(400, "the client went away (answered 499 once its rows were queued)"),
    MODEL_NOT_FOUND: ErrorCode(404, "'model' names neither the served model nor a loaded adapter"),
    NOT_FOUND: ErrorCode(404, "no such route"),
    METHOD_NOT_ALLOWED: ErrorCode(405, "the route does not take this method"),
    INVALID_INPUT: ErrorCode(400, "an item the model cannot embed (the message names it and why)"),
    INVALID_IMAGE: ErrorCode(400, "an image that is not valid base64 or not a supported image"),
    IMAGE_TOO_LARGE: ErrorCode(413, "an image over --max-image-bytes or --max-image-pixels"),
    ADAPTER_NOT_FOUND: ErrorCode(404, "an item's adapter (or its task's) is not loaded"),
    NON_FINITE_EMBEDDING: ErrorCode(400, "the item's vector overflowed the model's dtype (float16)"),
    IMAGE_SOURCE_REFUSED: ErrorCode(400, "a local path, a file: URL or another scheme: never read"),
    IMAGE_URL_REFUSED: ErrorCode(400, "an image URL the policy refuses (disabled, host, address, credentials)"),
    IMAGE_URL_FAILED: ErrorCode(400, "an allowed image URL that could not be fetched"),
    IMAGE_URL_TIMEOUT: ErrorCode(400, "an image URL slower than --image-url-timeout"),
    INVALID_API_KEY: ErrorCode(401, "a missing or wrong API key"),
    ADMIN_DISABLED: ErrorCode(403, "admin routes without --admin-api-key"),
    TOO_MANY_REQUESTS: ErrorCode(429, "over --max-concurrent-requests (with Retry-After)"),
    QUEUE_FULL: ErrorCode(429, "over --max-queue-tokens queued (with Retry-After)"),
    LORA_DISABLED: ErrorCode(404, "run-time adapter routes without --enable-lora (as if absent)"),
    LORA_ROOT_NOT_SET: ErrorCode(403, "run-time loading without --lora-root"),
    LORA_PATH_OUTSIDE_ROOT: ErrorCode(403, "an adapter path outside --lora-root"),
    LORA_PATH_NOT_FOUND: ErrorCode(400, "no adapter folder at that path"),
    INVALID_ADAPTER: ErrorCode(400, "an adapter folder that cannot be loaded (the message says why)"),
    ADAPTER_EXISTS: ErrorCode(400, "an adapter name already in use"),
    DRAIN_TIMEOUT: ErrorCode(503, "an unload whose admitted rows did not finish in --lora-drain-timeout"),
    ADAPTER_APPLY_TIMEOUT: ErrorCode(503, "a replica did not apply an adapter change in --adapter-apply-timeout"),
    MODEL_LOADING: ErrorCode(503, "the model is still loading (with Retry-After)"),
    MODEL_LOAD_FAILED: ErrorCode(503, "the model failed to load"),
    MODEL_PROCESS_EXITED: ErrorCode(503, "the model's process is gone"),
    INVALID_DEFAULT_TASK: ErrorCode(503, "--default-task is not a task of the model"),
    SHUTTING_DOWN: ErrorCode(503, "the server is draining"),
    INTERNAL_ERROR: ErrorCode(500, "a bug (the message carries the request id to find it in the log)"),
}


def status_of(code: str | None, default: int = 400) -> int:
    """The HTTP status a code goes with (the model's item codes included)."""
    known = ERROR_CODES.get(code) if code is not None else None
    return known.status if known is not None else default
