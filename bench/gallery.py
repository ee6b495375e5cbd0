"""Gallery scale: identify latency at 1k, 100k and 1M enrolled faces, enrollment rate, memory per million.

    python -m bench.gallery [--sizes 1000 100000 1000000] [--queries 300]

Synthetic 128-d embeddings shaped like a face gallery (4 photos per person around a per-person
centre, queries are new photos of enrolled people) are bulk-written to a real SQLite store; a
replica then loads them as the service does at start-up. Latency is ``GalleryReplica.identify``
(the change-log catch-up query plus the search, top 5 subjects), one query at a time; exact
numpy search and the IVF index (from ``OCELLUS_GALLERY_ANN_MIN_FACES`` faces) are both measured
at every size where they apply, and the IVF's top-1 subject is compared with the exact one.
Enrollment rate is measured through the store (one transaction per enrollment, fsync'd), the
part of ``POST /v1/galleries/{g}/subjects`` that grows with the gallery; detection + embedding
cost is per photo and is measured by the face pipeline's own latency line.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bench import common
from bench.common import ArgumentParser, machine, markdown_table, write_results
from service.gallery.index import FaceIndex
from service.gallery.replica import GalleryReplica
from service.gallery.store import GalleryStore, NewFace, changes, faces, sqlite_url, subjects

DIM = 128
SHOTS = 4  # photos per person
SPREAD = 0.35  # per-photo deviation from the person's centre (cosine to the centre ~0.94)


def synthetic(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` unit embeddings (SHOTS per person), each one's person index, and the people's centres."""
    rng = np.random.default_rng(seed)
    people = -(-count // SHOTS)
    centres = rng.standard_normal((people, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    owner = np.repeat(np.arange(people), SHOTS)[:count]
    noise = rng.standard_normal((count, DIM), dtype=np.float32) * (SPREAD / math.sqrt(DIM))
    vectors = centres[owner] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, owner, centres


def bulk_load(store: GalleryStore, vectors: np.ndarray, owner: np.ndarray, chunk: int = 20_000) -> list[str]:
    """Write the gallery as one big import (the benchmark's set-up, not what it measures)."""
    subject_ids = [uuid.uuid4().hex for _ in range(int(owner.max()) + 1)]
    now = time.time()
    with store.engine.begin() as connection:
        for start in range(0, len(subject_ids), chunk):
            connection.execute(
                subjects.insert(),
                [
                    {"id": s, "gallery": "bench", "name": f"person {start + i}", "created_at": now}
                    for i, s in enumerate(subject_ids[start : start + chunk])
                ],
            )
        for start in range(0, len(vectors), chunk):
            rows = range(start, min(start + chunk, len(vectors)))
            face_ids = [uuid.uuid4().hex for _ in rows]
            connection.execute(
                faces.insert(),
                [
                    {
                        "id": f,
                        "subject_id": subject_ids[owner[r]],
                        "gallery": "bench",
                        "model": "bench",
                        "model_version": "1",
                        "dim": DIM,
                        "embedding": vectors[r].tobytes(),
                        "box": "[0, 0, 1, 1]",
                        "created_at": now,
                    }
                    for f, r in zip(face_ids, rows, strict=True)
                ],
            )
            connection.execute(
                changes.insert(),
                [
                    {"gallery": "bench", "op": "add", "face_id": f, "subject_id": subject_ids[owner[r]], "at": now}
                    for f, r in zip(face_ids, rows, strict=True)
                ],
            )
    return subject_ids


async def latencies(replica: GalleryReplica, queries: np.ndarray) -> tuple[list[float], list[str]]:
    timings, best = [], []
    for query in queries:
        started = time.perf_counter()
        (matches,) = await replica.identify("bench", "bench", "1", query[None], top_k=5)
        timings.append(time.perf_counter() - started)
        best.append(matches[0].subject_id)
    return timings, best


def index_bytes(index: FaceIndex) -> int:
    import faiss

    total = index.nbytes
    if index._ivf is not None:
        total += int(faiss.serialize_index(index._ivf).nbytes)
    return total


async def measure(size: int, n_queries: int, ann_min: int, workdir: Path) -> list[dict[str, object]]:
    vectors, owner, centres = synthetic(size, seed=size)
    store = GalleryStore(sqlite_url(workdir / f"g{size}"))
    subject_ids = bulk_load(store, vectors, owner)
    rng = np.random.default_rng(1)
    people = rng.integers(0, int(owner.max()) + 1, n_queries)
    # A new photo of an enrolled person: their centre plus fresh noise.
    queries = centres[people] + rng.standard_normal((n_queries, DIM), dtype=np.float32) * (SPREAD / math.sqrt(DIM))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = [subject_ids[p] for p in people]

    replica = GalleryReplica(store, sync_interval_s=3600, ann_min=0)
    started = time.perf_counter()
    replica.load()
    load_s = time.perf_counter() - started
    await latencies(replica, queries[:20])  # warm-up
    exact_t, exact_best = await latencies(replica, queries)
    index = replica.indexes[("bench", "bench", "1")]
    rows = [
        {
            "faces": size,
            "search": "exact (numpy)",
            "p50 ms": round(1000 * float(np.percentile(exact_t, 50)), 2),
            "p99 ms": round(1000 * float(np.percentile(exact_t, 99)), 2),
            "top-1 = true person": round(float(np.mean([a == b for a, b in zip(exact_best, truth, strict=True)])), 4),
            "index MB per 1M faces": round(index_bytes(index) / size * 1e6 / 2**20, 1),
            "load s": round(load_s, 1),
        }
    ]
    if ann_min and size >= ann_min:
        index.ann_min = ann_min
        started = time.perf_counter()
        await replica.maintain()
        build_s = time.perf_counter() - started
        await latencies(replica, queries[:20])
        ivf_t, ivf_best = await latencies(replica, queries)
        rows.append(
            {
                "faces": size,
                "search": "IVF-SQ8 + exact re-score",
                "p50 ms": round(1000 * float(np.percentile(ivf_t, 50)), 2),
                "p99 ms": round(1000 * float(np.percentile(ivf_t, 99)), 2),
                "top-1 = true person": round(float(np.mean([a == b for a, b in zip(ivf_best, truth, strict=True)])), 4),
                "top-1 = exact": round(float(np.mean([a == b for a, b in zip(ivf_best, exact_best, strict=True)])), 4),
                "index MB per 1M faces": round(index_bytes(index) / size * 1e6 / 2**20, 1),
                "load s": round(load_s + build_s, 1),
            }
        )
    await replica.close()
    return rows


def enrollment_rate(workdir: Path, count: int = 300) -> dict[str, object]:
    store = GalleryStore(sqlite_url(workdir / "enroll"))
    vectors, _, _ = synthetic(count, seed=7)
    started = time.perf_counter()
    for i, vector in enumerate(vectors):
        store.create_subject("enroll", f"person {i}", NewFace(vector, "bench", "1", (0, 0, 1, 1)))
    seconds = time.perf_counter() - started
    store.close()
    return {"store": "SQLite (WAL, synchronous=FULL)", "enrollments": count, "per second": round(count / seconds, 1)}


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--sizes", type=common.positive(int), nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=common.positive(int), default=300)
    parser.add_argument("--ann-min", type=int, default=100_000, help="IVF from this many faces (the service's default)")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="ocellus-bench-") as tmp:
        for size in args.sizes:
            rows += asyncio.run(measure(size, args.queries, args.ann_min, Path(tmp)))
            print(rows[-1], flush=True)
        enroll = enrollment_rate(Path(tmp))
    result = {"machine": machine(), "identify": rows, "enrollment": enroll, "dim": DIM}
    markdown = (
        "# Gallery identify latency (one query at a time, top 5 subjects; catch-up query + search)\n\n"
        + markdown_table(rows)
        + f"\n\nEnrollment through the store: {enroll['per second']} per second ({enroll['store']}).\n"
    )
    write_results("gallery", result, markdown)


if __name__ == "__main__":
    main()
