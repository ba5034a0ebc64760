"""Adapters at run time: the admin routes and the `--lora-root` confinement rule (the gate that drains an
adapter before it leaves is in admission.py).

- `POST /v1/internal/lora/load {lora_name, lora_path}`, `POST /v1/internal/lora/unload {lora_name}`,
  `GET /v1/internal/lora`.
- Disabled (404) without `--enable-lora`; every call needs `Authorization: Bearer <--admin-api-key>`
  (compared in constant time); without an admin key the routes refuse everything (403).
- `lora_path` is resolved (symlinks included) and must lie inside `--lora-root`; relative paths are
  relative to it. Without `--lora-root` nothing can be loaded at run time.
- Load: the model validates the whole folder before anything changes; a bad folder answers 400 and the
  server is unchanged. Requests naming the adapter get 404 until it is loaded.
- Unload: the adapter stops admitting (new requests naming it get 404), rows already admitted finish,
  then it leaves the model. If it is still in use after `--lora-drain-timeout` it is kept (503).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nova.repo import is_base_model_name, model_class

from . import error_codes as codes
from .admission import adapter_not_found
from .errors import ApiError, bad_request
from .openmp import run_single_threaded

log = logging.getLogger("serve.lora")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def peft_folder(path: str) -> str:
    """The PEFT folder an adapter path names (the folder, or its `adapter_model.safetensors`): the model's own
    rule (`lora_nova_embeddings_v1.peft_folder`), so that the server and `model.load_adapter` accept the same
    paths. Raises ValueError ("does not exist", or a file that is not an adapter's weights)."""
    return model_class("peft_folder")(path)


def resolve_lora_path(root: str | None, given: object, *, root_flag: str = "--lora-root") -> str:
    """`given` (relative to `root`, or absolute) -> the real path of a PEFT folder inside `root`; the weights
    file of a PEFT folder names that folder. Symlinks are resolved before the check. Raises ApiError."""
    if root is None:
        raise ApiError(403, f"loading adapters at run time needs {root_flag} DIR", param="lora_path",
                       code=codes.LORA_ROOT_NOT_SET)
    if not isinstance(given, str) or not given or "\x00" in given:
        raise bad_request("'lora_path' must be a non-empty string", param="lora_path")
    real_root = os.path.realpath(root)
    candidate = given if os.path.isabs(given) else os.path.join(real_root, given)
    real = os.path.realpath(candidate)
    if real != real_root and os.path.commonpath([real, real_root]) != real_root:
        raise ApiError(403, f"'lora_path' must be inside {root_flag}", param="lora_path",
                       code=codes.LORA_PATH_OUTSIDE_ROOT)
    try:
        return peft_folder(real)
    except ValueError as exc:  # its message names the real path; the client is told about the path it gave
        reason = str(exc).removeprefix(f"{real}: ")
        raise bad_request(f"'lora_path' {given!r} under {root_flag}: {reason}", param="lora_path",
                          code=codes.LORA_PATH_NOT_FOUND) from None


def check_lora_name(name: object) -> str:
    """A name an adapter may be loaded under (ApiError otherwise): short, plain, and not a base-model alias."""
    if not isinstance(name, str) or not NAME_RE.match(name) or is_base_model_name(name):
        raise bad_request("'lora_name' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} and not be none/base",
                          param="lora_name")
    return name


def lora_routes(server, *, require_admin, read_json) -> list[Route]:
    """The admin routes. `server` is the app's `ServerState` (settings, model, gate, metrics); `require_admin(request)`
    and `read_json(request) -> dict` are the HTTP layer's key check and body reader (serve/routes.py)."""
    lock = asyncio.Lock()

    async def _guard(request: Request) -> None:
        if not server.settings.enable_lora:
            raise ApiError(404, "adapter management is disabled (start the server with --enable-lora)",
                           code=codes.LORA_DISABLED)
        require_admin(request)
        server.require_ready()

    _json = read_json

    def _name(payload: dict) -> str:
        return check_lora_name(payload.get("lora_name"))

    async def list_adapters(request: Request) -> JSONResponse:
        await _guard(request)
        adapters = server.model.list_adapters()
        data = []
        for name, info in adapters.items():
            data.append({"lora_name": name, "state": server.gate.state.get(name, "ready"),
                         "in_flight_rows": server.gate.in_flight.get(name, 0),
                         **{k: v for k, v in info.items() if k != "path"}})
        return JSONResponse({"object": "list", "data": data, "max_loras": server.model.max_loras,
                             "max_lora_rank": server.model.max_lora_rank})

    async def load(request: Request) -> JSONResponse:
        await _guard(request)
        payload = await _json(request)
        name = _name(payload)
        path = resolve_lora_path(server.settings.lora_root, payload.get("lora_path"))
        if name in server.settings.model_names():
            raise bad_request(f"{name!r} is the served model's name", param="lora_name", code=codes.ADAPTER_EXISTS)
        async with lock:
            if name in server.gate.state or name in server.model.list_adapters():
                raise bad_request(f"adapter {name!r} is already loaded; unload it first", param="lora_name",
                                  code=codes.ADAPTER_EXISTS)
            server.gate.state[name] = "loading"
            try:
                await asyncio.to_thread(run_single_threaded, server.model.load_adapter, name, path)
            except ValueError as exc:
                server.gate.state.pop(name, None)
                log.warning("adapter %r refused: %s", name, exc)
                raise bad_request(f"adapter refused: {exc}", param="lora_path", code=codes.INVALID_ADAPTER) from None
            except Exception as exc:
                server.gate.state.pop(name, None)
                log.exception("adapter %r failed to load", name)
                raise bad_request(f"adapter could not be loaded: {exc.__class__.__name__}: {exc}",
                                  param="lora_path", code=codes.INVALID_ADAPTER) from None
            server.gate.state[name] = "ready"
            server.metrics.adapters_loaded.set(len(server.model.list_adapters()))
        log.info("adapter %r loaded from %s", name, path)
        return JSONResponse({"lora_name": name, "status": "loaded"})

    async def unload(request: Request) -> JSONResponse:
        await _guard(request)
        payload = await _json(request)
        name = _name(payload)
        async with lock:
            if server.gate.state.get(name) != "ready":
                raise adapter_not_found(name, server.gate.ready_names(), param="lora_name")
            drained = await server.gate.drain(name, server.settings.lora_drain_timeout)
            if not drained:
                server.gate.state[name] = "ready"
                raise ApiError(503, f"adapter {name!r} is still in use after "
                               f"{server.settings.lora_drain_timeout:g}s; not unloaded", code=codes.DRAIN_TIMEOUT,
                               headers={"Retry-After": "5"})
            try:
                await asyncio.to_thread(run_single_threaded, server.model.unload_adapter, name)
            except ValueError as exc:
                server.gate.state[name] = "ready"
                raise bad_request(str(exc), param="lora_name") from None
            except TimeoutError as exc:  # another HTTP worker could not drain it in time
                server.gate.state[name] = "ready"
                raise ApiError(503, f"{exc}", code=codes.DRAIN_TIMEOUT, headers={"Retry-After": "5"}) from None
            server.gate.state.pop(name, None)
            server.metrics.adapters_loaded.set(len(server.model.list_adapters()))
        log.info("adapter %r unloaded", name)
        return JSONResponse({"lora_name": name, "status": "unloaded"})

    return [
        Route("/v1/internal/lora", list_adapters, methods=["GET"]),
        Route("/v1/internal/lora/load", load, methods=["POST"]),
        Route("/v1/internal/lora/unload", unload, methods=["POST"]),
    ]
