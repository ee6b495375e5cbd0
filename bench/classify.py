"""/v1/classify over real HTTP vs a bare ONNX Runtime loop on the same model, in one run.

    python -m bench.classify [--model cifar10-resnet] [--seconds 10]

Rows: the service with the micro-batcher (one two-threaded session, or two single-threaded
replicas: OCELLUS_ORT_SESSIONS=2), with batch-of-one serving (OCELLUS_MAX_BATCH_SIZE=1), and as one
process per core with one ONNX Runtime thread each (the compose layout: replicas behind a balancer), at
concurrency 1, 8 and 32; the ceiling is ONNX Runtime looping on pre-processed tensors with the
service's session options (one session at batch 1 and at the max batch size, two sessions side by
side at the max batch size: the best). A shared 2-core machine drifts by several per cent within
a minute, so the best layout is measured again just before each service setup and that setup's
rows are divided by the higher of the two measurements (a slow spell must not flatter the service).
Results go to bench/results/classify.{json,md} (classify-<model>.* for another --model).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import DATASETS, ArgumentParser, ServiceProcess, http_rows, machine, markdown_table, write_results
from service.cpus import available_cpus
from service.images import decode_image
from service.manifest import Manifest
from service.runtime import OnnxModel
from service.tasks.classification import preprocess

DEFAULT_MODEL = "cifar10-resnet"


def bare_onnxruntime(
    manifest: Manifest, folder: Path, tensors: np.ndarray, batch: int, seconds: float, sessions: int = 1
) -> float:
    """Images per second of session.run alone, ``sessions`` sessions looping side by side (the cores shared)."""
    threads = common.service_settings(ort_sessions=sessions).intra_op_threads
    outputs = list(manifest.outputs.values())
    models = [OnnxModel(folder / manifest.file, manifest.input.name, outputs, threads) for _ in range(sessions)]
    done = [0] * sessions

    def loop(index: int, deadline: float) -> None:
        while time.perf_counter() < deadline:
            start = done[index] % (len(tensors) - batch + 1)
            models[index].run(tensors[start : start + batch])
            done[index] += batch

    for model in models:
        model.run(tensors[:batch])
    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i, started + seconds)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - started)


def bare_row(setup: str, rps: float, ceiling: float) -> dict[str, object]:
    return {
        "setup": setup,
        "concurrency": "-",
        "rps": round(rps, 1),
        "p50_ms": "-",
        "p99_ms": "-",
        "errors": 0,
        "of_ceiling": round(rps / ceiling, 3),
    }


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=common.positive(float), default=10.0)
    parser.add_argument("--concurrency", type=common.positive(int), nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=common.positive(int), default=32)
    args = parser.parse_args()

    folder, manifest = common.served_model(args.model, "classification")
    photos = common.dataset_photos(sorted((DATASETS / "cifar10" / "test").glob("*/*.jpg"))[::40][:256], DATASETS / "cifar10")
    bodies = [p.read_bytes() for p in photos]
    tensors = np.concatenate([preprocess(decode_image(b, 10**8), manifest) for b in bodies])

    bare = {
        (1, 1): bare_onnxruntime(manifest, folder, tensors, 1, args.seconds),
        (1, args.max_batch): bare_onnxruntime(manifest, folder, tensors, args.max_batch, args.seconds),
        (2, args.max_batch): bare_onnxruntime(manifest, folder, tensors, args.max_batch, args.seconds, sessions=2),
    }
    best = max(bare, key=bare.__getitem__)
    rows = [bare_row(f"bare ONNX Runtime, {sessions} session(s), batch {b}", v, bare[best]) for (sessions, b), v in bare.items()]
    cpus = available_cpus()
    setups = (  # (rows' name, environment of each process, how many processes)
        ("service, micro-batcher", {"OCELLUS_ORT_SESSIONS": "1"}, 1),
        ("service, micro-batcher, 2 session replicas", {"OCELLUS_ORT_SESSIONS": "2"}, 1),
        ("service, batch of one", {"OCELLUS_MAX_BATCH_SIZE": "1"}, 1),
        # The compose layout (replicas behind a load balancer) on this host: one process per core, each
        # with one ONNX Runtime thread; the load generator deals the connections out as nginx would.
        (f"{cpus} service processes, 1 thread each", {"OCELLUS_ORT_THREADS": "1"}, cpus),
    )
    for setup, env, processes in setups:
        with contextlib.ExitStack() as stack:
            env = {"OCELLUS_MAX_BATCH_SIZE": str(args.max_batch), **env}
            services = [stack.enter_context(ServiceProcess(env)) for _ in range(processes)]
            again = bare_onnxruntime(manifest, folder, tensors, best[1], args.seconds, sessions=best[0])  # service idle
            ceiling = max(bare[best], again)  # a slow spell while measuring must not flatter the service
            rows.append(bare_row(f"bare ONNX Runtime, {best[0]} session(s), batch {best[1]}, again", again, ceiling))
            rows += http_rows(
                setup,
                services,
                f"/v1/classify?model={args.model}&top_k=1",
                bodies,
                args.concurrency,
                args.seconds,
                ceiling,
            )

    info = machine()
    markdown = (
        f"# /v1/classify benchmark ({args.model})\n\n{info['date']}, {info['cpus']} CPUs, onnxruntime "
        f"{info['onnxruntime']}, {args.seconds:g} s per row, {len(bodies)} CIFAR-10 test JPEGs sent as raw "
        f"bodies over keep-alive HTTP/1.1.\n`of_ceiling` = requests/s over the best bare ONNX Runtime layout "
        f"({best[0]} session(s), batch {best[1]}), measured again (row `again`) just before each service setup; "
        "the higher of the two is that setup's ceiling.\n"
        "`loop_ms` / `workers_ms`: CPU the service spent per request in its event loop / in its other threads "
        "(ONNX Runtime, decoding), from /proc; the bare loop needs 2000 / (its images/s) core-ms per image."
        f"\n\n{markdown_table(rows)}\n"
    )
    name = common.results_name("classify", args.model, DEFAULT_MODEL)
    write_results(name, {"machine": info, "model": args.model, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
