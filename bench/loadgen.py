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
    requests: int  # answered 200: the throughput and latencies count these alone
    errors: int
    seconds: float
    latencies_ms: list[float]
    first_error: str | None = None  # its status line

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def check(self, path: str) -> LoadResult:
        """``self``, unless a request failed: a refusal (a wrong model, an overload) is no measure of serving."""
        if self.errors:
            raise SystemExit(
                f"{self.errors} of {self.errors + self.requests} requests to {path} failed (first: {self.first_error}): "
                "nothing written"
            )
        if not self.requests:
            raise SystemExit(f"no request to {path} was answered within {self.seconds:.1f} s: give more --seconds")
        return self

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
    host: str, port: int, requests: list[bytes], deadline: float, latencies: list[float], failures: list[str]
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
            if status_line.startswith(b"HTTP/1.1 200"):
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures.append(status_line.decode("latin-1").strip())
    finally:
        writer.close()


async def _run(host: str, ports: list[int], requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    latencies: list[float] = []
    failures: list[str] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _worker(host, ports[i % len(ports)], requests[i::concurrency] or requests, deadline, latencies, failures)
            for i in range(concurrency)
        )
    )
    seconds = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), len(failures), seconds, latencies, failures[0] if failures else None)


def run_load(host: str, ports: list[int], requests: list[bytes], concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` keep-alive connections sending ``requests`` for ``seconds``, dealt out among ``ports`` in
    turn: the even split a load balancer in front of several services would make."""
    return asyncio.run(_run(host, ports, requests, concurrency, seconds))
