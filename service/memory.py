"""Freed memory handed back to the system once a burst of large photos is over.

glibc's malloc keeps what a request freed for the process's next allocations: after 16 concurrent 12 MP photos to
/v1/detect, /v1/segment and /v1/faces/embed, a replica stayed at 1,045 MB (328 MB before) for good, and a host or a
container limit counts that. ``malloc_trim`` gives the free pages back (down to 425 MB there); it is called once the
pixel budget has been idle a moment after enough work, so no request pays for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable

from service.budget import PixelBudget

log = logging.getLogger("ocellus")

IDLE_S = 2.0  # how long no photo is in progress before the heap is trimmed
MIN_PIXELS = 10_000_000  # of photos worked on since the last trim (a few small photos leave little to give back)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the heap's free pages back to the system (nothing to do without glibc)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


async def trim_when_idle(budget: PixelBudget) -> None:
    """Run for the server's life: trim the heap each time the budget has been idle IDLE_S after MIN_PIXELS of work."""
    trimmed_at = budget.given_back
    while True:
        await asyncio.sleep(IDLE_S / 4)
        idle = budget.free == budget.total and time.monotonic() - budget.idle_since >= IDLE_S  # (not a gap in steady traffic)
        if idle and budget.given_back - trimmed_at >= MIN_PIXELS:
            trimmed_at = budget.given_back
            await asyncio.to_thread(trim_heap)
            log.debug("heap trimmed")
