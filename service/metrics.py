"""Prometheus metrics, one registry per app (so several apps in one process stay apart)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ocellus_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "ocellus_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter("ocellus_errors", "Error responses by code", ["status", "code"], registry=self.registry)
        self.inference = Histogram(
            "ocellus_inference_seconds", "session.run time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "ocellus_batch_size",
            "samples per session.run",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "ocellus_queue_seconds",
            "time a request waited in a model's queue before its batch ran (Triton: queue duration)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ocellus_queue_depth", "requests queued for a model and not yet in a batch", ["model"], registry=self.registry
        )
        self.in_progress = Gauge(
            "ocellus_requests_in_progress",
            "requests being handled, probes and metrics aside (refused with 503 beyond OCELLUS_MAX_REQUESTS)",
            registry=self.registry,
        )
        self.models = Gauge("ocellus_models", "models in the repository by state", ["state"], registry=self.registry)
        self.gallery_up = Gauge(
            "ocellus_gallery_up", "1 while this replica's gallery sync reaches the store, else 0", registry=self.registry
        )
        self.gallery_faces = Gauge("ocellus_gallery_faces", "enrolled faces in this replica's index", registry=self.registry)
        self.gallery_sync_age = Gauge(
            "ocellus_gallery_sync_age_seconds",
            "seconds since this replica last had every enrollment and deletion of the store (+Inf: never)",
            registry=self.registry,
        )
        self.gallery_search = Histogram(
            "ocellus_gallery_search_seconds",
            "time an identification spent searching the in-memory index (exact or IVF)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def forget(self, model: str) -> None:
        """Drop a model's series once it is no longer served (a reload removed it)."""
        for family in (self.inference, self.batch_size, self.queue_seconds, self.queue_depth):
            with contextlib.suppress(KeyError):
                family.remove(model)

    def observer(self, model: str) -> Callable[[int, float, Sequence[float]], None]:
        """A callback for the micro-batcher: each run's batch size and seconds, and how long its requests queued."""

        def observe(size: int, seconds: float, waits: Sequence[float]) -> None:
            # The series are looked up at each run, not bound at load: a retired replica of the same name, closed
            # after this one loaded, forgets them, and bound ones would then vanish from /metrics for good.
            inference, batch_size, queued = (f.labels(model) for f in (self.inference, self.batch_size, self.queue_seconds))
            inference.observe(seconds)
            batch_size.observe(size)
            for wait in waits:
                queued.observe(wait)

        return observe

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Read ``model``'s queue length when scraped (the model's latest batcher: a reload's replaces the last)."""
        self.queue_depth.labels(model).set_function(depth)
