"""Worker threads for CPU-heavy request work: images (decoding, pre- and post-processing, PNG/JPEG encoding)
and /v2's compressed bodies.

Bounded apart from Starlette's default pool of 40: a few small uploads of many pixels each cost ~200 MB
while they decode, and 40 at once would take a replica past its memory limit; more decodes at once than
twice the usable CPUs would only share the same cores. (ONNX Runtime runs in the micro-batchers' own
threads, and gallery store calls in theirs.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

from service import timing
from service.cpus import available_cpus

T = TypeVar("T")
# One limiter per event loop (as anyio's own default one): a limiter's waiters belong to the loop they wait in,
# and several loops run in one process when apps are served from threads (the tests do).
_IMAGE_THREADS: RunVar[anyio.CapacityLimiter] = RunVar("ocellus_image_threads")


def image_threads() -> anyio.CapacityLimiter:
    try:
        return _IMAGE_THREADS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(max(4, 2 * available_cpus()))
        _IMAGE_THREADS.set(limiter)
        return limiter


async def image_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in one of the image worker threads (waiting for a free one); its time is the request's ``image``."""
    spent = timing.current()

    def timed_work() -> T:
        started = time.perf_counter()
        try:
            return work(*args)
        finally:
            timing.add("image", started, time.perf_counter(), spent)

    return await anyio.to_thread.run_sync(timed_work, limiter=image_threads())
