"""Request ids and log lines: the id of the request being served, on every line it logs.

``RequestIdMiddleware`` (``app.py``) sets :data:`request_id` at the start of each request; asyncio
copies the context into every task the request starts (the streaming response, the runtime's tasks)
and ``asyncio.to_thread`` / anyio into their threads, so code anywhere under the request sees it.
:class:`RequestIdFilter` puts it on each record, and the two formatters write it: ``text`` (the
default, uvicorn's look) or ``json`` (one object per line: time, level, logger, message,
request_id; for log collectors). ``setup_logging`` is what ``atlas serve`` calls.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]

#: The id of the request this code runs for (None outside any request: start-up, the worker thread).
request_id: ContextVar[str | None] = ContextVar("atlas_request_id", default=None)

#: What a client's own X-Request-ID may look like: printable, no spaces, no quotes, at most 128
#: characters. Anything else (a log-injection attempt, a megabyte of header) is replaced by a new id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

#: The loggers uvicorn writes to; with ``log_config=None`` they propagate to the root handler.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str) -> bool:
    return _CLIENT_ID.fullmatch(value) is not None


def current_request_id() -> str | None:
    return request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (None outside a request). On the handler, so that records of every
    logger (uvicorn's, the engine's) get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """``INFO:     atlas.server: message`` (uvicorn's look), with ``[request-id]`` before the logger's
    name on the lines of a request."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        line = f"{record.levelname + ':':<9} {f'[{rid}] ' if rid else ''}{record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
    ``message``, ``request_id`` (null outside a request), and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup_logging(level: str = "info", fmt: LogFormat = "text") -> logging.Handler:
    """One stderr handler on the root logger, with the request id filter and the chosen format;
    uvicorn's loggers lose their own handlers and propagate to it (run uvicorn with
    ``log_config=None``). Returns the handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    return handler
