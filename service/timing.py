"""Where a request's time went, by kind of work: the ``Server-Timing`` answer header and the access log's ``timings``.

``image`` (decoding, pre- and post-processing, encoding, in the image threads), ``queue`` (waiting for a
micro-batch), ``infer`` (the model runs of its batches), ``store`` (gallery store calls, a free connection
included) and ``search`` (the in-memory gallery search), each summed over the request, beside its ``total``.
Browsers' developer tools draw the header; a client sees whether a slow answer was the model, the queue or
the database without reading server logs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Spent = dict[str, float]  # kind of work -> seconds

# The request's own dict, set by the middleware: tasks and threads started for the request share it (a context
# copy holds the same object), so work done for it anywhere adds to it.
_SPENT: ContextVar[Spent | None] = ContextVar("ocellus_spent", default=None)


def begin() -> Spent:
    spent: Spent = {}
    _SPENT.set(spent)
    return spent


def current() -> Spent | None:
    """The running request's record (None outside a request: the gallery's background sync)."""
    return _SPENT.get()


def add(kind: str, seconds: float, spent: Spent | None = None) -> None:
    target = spent if spent is not None else _SPENT.get()
    if target is not None:
        target[kind] = target.get(kind, 0.0) + seconds


@contextmanager
def timed(kind: str) -> Iterator[None]:
    spent, started = _SPENT.get(), time.perf_counter()
    try:
        yield
    finally:
        add(kind, time.perf_counter() - started, spent)


def header(spent: Spent, total_s: float) -> bytes:
    """``image;dur=1.9, infer;dur=4.2, total;dur=7.0`` (milliseconds, as the Server-Timing header has them)."""
    parts = [f"{kind};dur={seconds * 1000:.1f}" for kind, seconds in spent.items()]
    return ", ".join([*parts, f"total;dur={total_s * 1000:.1f}"]).encode("ascii")


def milliseconds(spent: Spent) -> dict[str, float]:
    return {kind: round(seconds * 1000, 2) for kind, seconds in spent.items()}
