"""/v1/classify over real HTTP vs a bare ONNX Runtime loop on the same model, in one run.

    python -m bench.classify [--model cifar10-resnet] [--seconds 10]

Rows: the service with the micro-batcher, the service with batch-of-one serving
(OCELLUS_MAX_BATCH_SIZE=1), at concurrency 1, 8 and 32; the ceiling is ONNX Runtime looping
on pre-processed tensors (batch 1 and batch = max batch size) with the service's session
options. Results go to bench/results/classify.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import DATASETS, ROOT, ServiceProcess, http_rows, machine, markdown_table, write_results
from service.images import decode_image
from service.manifest import Manifest
from service.runtime import OnnxModel
from service.settings import Settings
from service.tasks.classification import preprocess


def bare_onnxruntime(manifest: Manifest, folder: Path, tensors: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of session.run alone."""
    model = OnnxModel(
        folder / manifest.file, manifest.input.name, list(manifest.outputs.values()), threads=Settings().intra_op_threads
    )
    for _ in range(3):
        model.run(tensors[:batch])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = done % (len(tensors) - batch + 1)
        model.run(tensors[start : start + batch])
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-resnet")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    folder = ROOT / "models" / args.model
    manifest = Manifest.read(folder)
    photos = sorted((DATASETS / "cifar10" / "test").glob("*/*.jpg"))[::40][:256]
    bodies = [p.read_bytes() for p in photos]
    tensors = np.concatenate([preprocess(decode_image(b, 10**8), manifest) for b in bodies])

    ceiling = {b: bare_onnxruntime(manifest, folder, tensors, b, args.seconds) for b in (1, args.max_batch)}
    rows: list[dict[str, object]] = [
        {
            "setup": f"bare ONNX Runtime, batch {b}",
            "concurrency": "-",
            "rps": round(v, 1),
            "p50_ms": "-",
            "p99_ms": "-",
            "errors": 0,
            "of_ceiling": round(v / ceiling[args.max_batch], 3),
        }
        for b, v in ceiling.items()
    ]
    for setup, batch in (("service, micro-batcher", args.max_batch), ("service, batch of one", 1)):
        with ServiceProcess({"OCELLUS_MAX_BATCH_SIZE": str(batch)}) as service:
            rows += http_rows(
                setup,
                service.port,
                f"/v1/classify?model={args.model}&top_k=1",
                bodies,
                args.concurrency,
                args.seconds,
                ceiling[args.max_batch],
            )

    info = machine()
    markdown = (
        f"# /v1/classify benchmark ({args.model})\n\n{info['date']}, {info['cpus']} CPUs, onnxruntime "
        f"{info['onnxruntime']}, {args.seconds:g} s per row, {len(bodies)} CIFAR-10 test JPEGs sent as raw "
        f"bodies over keep-alive HTTP/1.1.\n`of_ceiling` = requests/s over bare ONNX Runtime at batch "
        f"{args.max_batch} in the same run.\n\n{markdown_table(rows)}\n\nCommand: `python -m bench.classify "
        f"--seconds {args.seconds:g}`\n"
    )
    write_results("classify", {"machine": info, "model": args.model, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
