"""The server's log lines: one handler on stderr, each line carrying the id of the request it belongs to.

Its own module so that whatever sets up logging (the command line, the engine's process) needs nothing above it:
the filter reads the request id from `errors.request_id_var`, which the request middleware sets.
"""

from __future__ import annotations

import logging

from nova.command import StderrHandler

from .errors import request_id_var


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (the id of the request being handled, or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(level: str) -> None:
    handler = StderrHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # serve.access logs with request ids instead
