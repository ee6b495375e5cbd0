"""How many pixels of uploaded photos a process works on at once.

Every request in progress may hold its photo decoded at full size (a 50 MP photo is 150 MB as RGB, more as the
copies a denoise or an overlay keeps) while it waits its turn for the model, and nothing else bounded how many did:
eight 50 MP overlays took a replica to 4.3 GB, past the compose file's limit. A request now takes its photos'
pixels from this budget before decoding them and gives them back once its answer is sent; past the budget it
waits, at most OCELLUS_REQUEST_TIMEOUT_S, then answers 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class PixelBudget:
    """A first-come, first-served count of pixels, for one event loop. A request larger than the whole budget
    takes all of it (it then runs alone)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.given_back = 0  # pixels given back so far (the heap trimmer's measure of work done)
        self.idle_since = time.monotonic()  # when the last pixels in use were given back
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, pixels: int, timeout_s: float) -> int:
        """Wait until ``pixels`` (at most the total) are free and take them; returns how many were taken. Raises
        TimeoutError after ``timeout_s``."""
        pixels = min(pixels, self.total)
        if self.fits(pixels):
            self.free -= pixels
            return pixels
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, granted)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout_s):  # (3.11's wait_for could lose a cancellation as the wait ended)
                await asyncio.shield(granted)
        except BaseException:  # a timeout, or the client gone: not taken after all
            if granted.done():
                self.give(pixels)  # granted just as the wait ended
            else:
                self._waiting.remove(entry)
                self._grant()  # the ones behind it may fit now
            raise
        return pixels

    def fits(self, pixels: int) -> bool:
        """Whether ``pixels`` can be taken without waiting (0: no image, whose answer is an error)."""
        return not pixels or (not self._waiting and min(pixels, self.total) <= self.free)

    def give(self, pixels: int) -> None:
        self.free += pixels
        self.given_back += pixels
        if self.free == self.total:
            self.idle_since = time.monotonic()
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            pixels, granted = self._waiting.popleft()
            self.free -= pixels
            granted.set_result(None)
