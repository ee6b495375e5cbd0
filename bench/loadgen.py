"""A tiny HTTP/1.1 keep-alive load generator (asyncio streams, no client library overhead).

Python HTTP clients cost more CPU per request than the model does on a 2-core machine; this one
sends pre-built request bytes and parses only the status line and Content-Length, so the
benchmark measures the server, not the client.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def row(self) -> dict[str, float]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2),
        }


def build_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _worker(
    host: str, port: int, requests: list[bytes], deadline: float, latencies: list[float], counter: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            payload = requests[i % len(requests)]
            i += 1
            started = time.perf_counter()
            writer.write(payload)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if not status_line.startswith(b"HTTP/1.1 200"):
                counter[0] += 1
    finally:
        writer.close()


async def _run(host: str, ports: list[int], requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    latencies: list[float] = []
    errors = [0]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _worker(host, ports[i % len(ports)], requests[i::concurrency] or requests, deadline, latencies, errors)
            for i in range(concurrency)
        )
    )
    return LoadResult(concurrency, len(latencies), errors[0], time.perf_counter() - started, latencies)


def run_load(host: str, ports: list[int], requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` keep-alive connections sending ``requests`` for ``seconds``, dealt out among ``ports`` in
    turn: the even split a load balancer in front of several services would make."""
    return asyncio.run(_run(host, ports, requests, concurrency, seconds))
