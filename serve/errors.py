"""Every failure in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import contextvars
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import error_codes as codes

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


def bad_request(message: str, *, param: str | None = None, code: str | None = codes.INVALID_REQUEST) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_item_error(exc: Exception, *, position: int | None = None, param_prefix: str = "input") -> ApiError:
    """The one mapping of the model's typed item errors (`ItemError`: `.index`, `.code`, `.field`) to OpenAI's
    shape: 404 for an adapter that is not loaded, 400 otherwise, `param` naming the item (`input[3].image`).
    `position` overrides the index (a row retried alone). A plain ValueError is a 400 without a param."""
    index = getattr(exc, "index", None) if position is None else position
    code = getattr(exc, "code", None) or codes.INVALID_INPUT
    field = getattr(exc, "field", None)
    param = None if index is None else f"{param_prefix}[{index}]" + (f".{field}" if field else "")
    return ApiError(codes.status_of(code), str(exc) or type(exc).__name__, param=param,
                    code=code)


# ---- Starlette exception handlers (framework-level errors in the same shape) ----

_HTTP_CODES = {404: codes.NOT_FOUND, 405: codes.METHOD_NOT_ALLOWED, 413: codes.PAYLOAD_TOO_LARGE}


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
                    code=codes.INTERNAL_ERROR).response()
