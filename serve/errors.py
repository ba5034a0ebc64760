"""Every failure in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import contextvars
import logging
import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("serve.errors")

# The id of the request being handled ('-' outside one); set by the request middleware, read by the logs and
# by the 500 answer (so that a user can quote it and an operator can find the traceback).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# HTTP status -> OpenAI error type (what the official SDK maps to its exception classes).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


_ITEM_RE = re.compile(r"^item (\d+): ")


def from_value_error(exc: ValueError, *, param_prefix: str = "input") -> ApiError:
    """Map the model's `ValueError("item {i}: ...")` to a 400 naming the item (404 for an adapter that is
    not loaded). Typed item errors carry their index, code and field; plain ones are read from the message."""
    message = str(exc) or exc.__class__.__name__
    code = getattr(exc, "code", None)
    index = getattr(exc, "index", None)
    if code is not None and index is not None:
        field = getattr(exc, "field", None)
        param = f"{param_prefix}[{index}]" + (f".{field}" if field else "")
        return ApiError(404 if code == "adapter_not_found" else 400, message, param=param, code=code)
    match = _ITEM_RE.match(message)
    param = f"{param_prefix}[{match.group(1)}]" if match else None
    return ApiError(400, message, param=param, code="invalid_input")


# ---- Starlette exception handlers (framework-level errors in the same shape) ----

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def http_exception_handler(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    err = ApiError(status, message, code=_HTTP_CODES.get(status), headers=dict(exc.headers or {}))
    return err.response()


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def unhandled_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return ApiError(500, f"internal server error (request id {request_id_var.get()})",
                    code="internal_error").response()
