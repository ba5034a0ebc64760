"""The Starlette application: `create_app(settings, model=None)`, the public entry point (the CLI and the Ray
Serve replicas build on it).

With `model=None` the app answers at once and loads the model in the background, in a process of its own
unless `settings.engine` is "thread" (`/health` is 503 until it is ready); a model object runs on this
process's threads and is ready as soon as the lifespan starts. Where each part of a
request is handled: see serve/state.py's docstring.
"""

from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from .config import Settings
from .errors import ApiError, api_error_handler, http_exception_handler, unhandled_exception_handler
from .logs import RequestIdFilter
from .routes import RequestContextMiddleware, build_routes
from .state import ServerState

__all__ = ["create_app", "RequestIdFilter", "ServerState"]


def create_app(settings: Settings, model=None, *, engine_link=None, shared_limits=None) -> Starlette:
    """`engine_link`, `shared_limits`: this app is one HTTP worker of several (serve/workers.py), attached to
    the model process the supervisor started."""
    settings.validate()
    settings.engine_kind(model_given=model is not None)  # a model object cannot run in another process
    if settings.http_workers > 1 and engine_link is None:
        raise ValueError("http_workers > 1 is run by `nova serve` (serve/workers.py starts the workers); "
                         "create_app builds one worker's app")
    server = ServerState(settings, model, engine_link=engine_link, shared_limits=shared_limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = Starlette(
        routes=build_routes(server),
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_exception_handler,
        },
    )
    app.add_middleware(RequestContextMiddleware, server=server)
    app.state.nova = server
    return app
