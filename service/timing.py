"""Where a request's time went, by kind of work: the ``Server-Timing`` answer header and the access log's ``timings``.

``image`` (decoding, pre- and post-processing, encoding, in the image threads), ``queue`` (waiting for a
micro-batch), ``infer`` (the model runs of its batches), ``store`` (gallery store calls, a free connection
included) and ``search`` (the in-memory gallery search). Each kind is the time during which the request had
such work under way: the union of its intervals, so two photos decoded at once, or two parts of a request
sharing one batch, count once, and no kind exceeds the request's ``total``. Browsers' developer tools draw the
header; a client sees whether a slow answer was the model, the queue or the database without reading logs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Spent = dict[str, list[tuple[float, float]]]  # kind of work -> (start, end) intervals, time.perf_counter() seconds

# The request's own record, set by the middleware: tasks and threads started for the request share it (a context
# copy holds the same object), so work done for it anywhere adds to it (list.append is atomic under the GIL).
_SPENT: ContextVar[Spent | None] = ContextVar("ocellus_spent", default=None)


def begin() -> Spent:
    spent: Spent = {}
    _SPENT.set(spent)
    return spent


def current() -> Spent | None:
    """The running request's record (None outside a request: the gallery's background sync)."""
    return _SPENT.get()


def add(kind: str, start: float, end: float, spent: Spent | None = None) -> None:
    target = spent if spent is not None else _SPENT.get()
    if target is not None:
        target.setdefault(kind, []).append((start, end))


@contextmanager
def timed(kind: str) -> Iterator[None]:
    spent, started = _SPENT.get(), time.perf_counter()
    try:
        yield
    finally:
        add(kind, started, time.perf_counter(), spent)


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``intervals``."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def milliseconds(spent: Spent) -> dict[str, float]:
    return {kind: round(covered(list(intervals)) * 1000, 2) for kind, intervals in spent.items()}


def header(spent: Spent, total_s: float) -> bytes:
    """``image;dur=1.9, infer;dur=4.2, total;dur=7.0`` (milliseconds, as the Server-Timing header has them)."""
    parts = [f"{kind};dur={ms:.1f}" for kind, ms in milliseconds(spent).items()]
    return ", ".join([*parts, f"total;dur={total_s * 1000:.1f}"]).encode("ascii")
