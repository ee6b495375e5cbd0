"""Structured JSON logs, one object per line (request ids come from the middleware)."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import time
from contextvars import ContextVar
from pathlib import Path

import PIL._imaging  # noqa: F401  (Pillow's C module: it loads the libtiff that quiet_libtiff finds)

# Record attributes that are not extra fields (uvicorn adds an ANSI-coloured copy of its message).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


# The id of the request being served, set by the middleware: a line logged while serving it carries it, and work
# queued for it (a micro-batch) keeps it to name the requests a failure touched.
_REQUEST_ID: ContextVar[str | None] = ContextVar("ocellus_request_id", default=None)


def set_request_id(request_id: str) -> None:
    _REQUEST_ID.set(request_id)


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := _REQUEST_ID.get()) is not None:
            entry["request_id"] = request_id  # an explicit extra request_id, as the access line's, wins below
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@functools.cache  # once per process, not per app
def quiet_libtiff() -> bool:
    """libtiff prints its warnings and errors to stderr by itself ("ZIPDecode: Decoding error at scanline 0"),
    plain lines amid the JSON ones. Pillow turns the errors that matter into exceptions (the upload's 400),
    so libtiff's own handlers are switched off. Found through /proc/self/maps (Linux, as in the image);
    returns whether a libtiff was."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    paths = {line.split()[-1] for line in maps.splitlines() if "/" in line and "libtiff" in line.rsplit("/", 1)[-1]}
    for path in paths:
        library = ctypes.CDLL(path)
        for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
            setter = getattr(library, name)
            setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
            setter(None)
    return bool(paths)


def configure_logging(level: str) -> None:
    quiet_libtiff()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ocellus")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def uvicorn_log_config(level: str) -> dict:
    """uvicorn's own lines (start-up, shutdown, "Invalid HTTP request received") and Python warnings in the
    same JSON shape, so that every line of the log parses."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    quiet = {"handlers": ["json"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {"uvicorn": quiet, "uvicorn.error": quiet, "py.warnings": quiet},
        # Other libraries' warnings (SQLAlchemy's pool, asyncio's "Task exception was never retrieved") else reach
        # Python's last-resort handler as plain multi-line text, in the outages a log pipeline must show.
        "root": {"handlers": ["json"], "level": "WARNING"},
    }
