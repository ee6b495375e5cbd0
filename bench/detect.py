"""/v1/detect over real HTTP vs a bare ONNX Runtime loop on the same model, in one run.

    python -m bench.detect [--model facemask-detector] [--seconds 10]

Rows: the ceiling is ONNX Runtime looping on pre-processed (letterboxed) tensors at batch 1 and
batch = max batch size with the service's session options; next to it the same loop doing the
whole per-image work in one thread (JPEG decode + letterbox + graph + threshold/NMS + mapping);
then the service with the micro-batcher and with batch-of-one serving
(OCELLUS_MAX_BATCH_SIZE=1) at concurrency 1, 8 and 32. The requests are the held-out facemask
test photos as raw JPEG bodies. Results go to bench/results/detect.{json,md}
(detect-<model>.* for another --model).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import DATASETS, ROOT, ArgumentParser, ServiceProcess, http_rows, machine, markdown_table, write_results
from service.images import decode_for_graph, decode_image
from service.manifest import Manifest
from service.runtime import OnnxModel
from service.tasks import detection

DEFAULT_MODEL = "facemask-detector"


def session(manifest: Manifest, folder: Path) -> OnnxModel:
    return OnnxModel(
        folder / manifest.file,
        manifest.input.name,
        list(manifest.outputs.values()),
        threads=common.service_settings().intra_op_threads,
    )


def bare_onnxruntime(model: OnnxModel, tensors: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of session.run alone."""
    for _ in range(3):
        model.run(tensors[:batch])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = done % (len(tensors) - batch + 1)
        model.run(tensors[start : start + batch])
        done += batch
    return done / (time.perf_counter() - started)


def bare_pipeline(model: OnnxModel, manifest: Manifest, bodies: list[bytes], seconds: float) -> tuple[float, list[float]]:
    """Images per second and latencies (ms) of decode -> letterbox -> graph -> NMS -> original pixels."""
    defaults = manifest.defaults
    latencies: list[float] = []
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        data = bodies[done % len(bodies)]
        begun = time.perf_counter()
        decoded = decode_for_graph(data, 10**9, manifest.input.color, manifest.input.size, keep_photo=False)
        inputs, letterbox = detection.preprocess(decoded.image, manifest)
        boxes, scores = model.run(inputs)
        kept, _, _ = detection.select(
            boxes[0], scores[0], defaults["score_threshold"], defaults["iou_threshold"], defaults["max_detections"]
        )
        detection.to_original(kept, letterbox, decoded.span)
        latencies.append((time.perf_counter() - begun) * 1000)
        done += 1
    return done / (time.perf_counter() - started), latencies


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=common.positive(float), default=10.0)
    parser.add_argument("--concurrency", type=common.positive(int), nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=common.positive(int), default=32)
    args = parser.parse_args()

    folder, manifest = common.served_model(args.model, "detection")
    split = json.loads((ROOT / "training" / "splits" / "facemask.json").read_text())
    photos = [DATASETS / "facemask" / "images" / f"{key}.jpg" for key in split["test"]]
    photos = common.dataset_photos([p for p in photos if p.is_file()], DATASETS / "facemask" / "images")
    bodies = [p.read_bytes() for p in photos]
    tensors = np.concatenate([detection.preprocess(decode_image(b, 10**9), manifest)[0] for b in bodies])

    model = session(manifest, folder)
    ceiling = {b: bare_onnxruntime(model, tensors, b, args.seconds) for b in (1, args.max_batch)}
    top = max(ceiling.values())
    rows: list[dict[str, object]] = [
        {
            "setup": f"bare ONNX Runtime, batch {b}",
            "concurrency": "-",
            "rps": round(v, 1),
            "p50_ms": "-",
            "p99_ms": "-",
            "errors": 0,
            "of_ceiling": round(v / top, 3),
        }
        for b, v in ceiling.items()
    ]
    rate, latencies = bare_pipeline(model, manifest, bodies, args.seconds)
    ordered = sorted(latencies)
    rows.append(
        {
            "setup": "bare pipeline (decode + letterbox + ORT + NMS), 1 thread",
            "concurrency": 1,
            "rps": round(rate, 1),
            "p50_ms": round(ordered[len(ordered) // 2], 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "errors": 0,
            "of_ceiling": round(rate / top, 3),
        }
    )
    del model
    for setup, batch in (("service, micro-batcher", args.max_batch), ("service, batch of one", 1)):
        with ServiceProcess({"OCELLUS_MAX_BATCH_SIZE": str(batch)}) as service:
            rows += http_rows(setup, [service], f"/v1/detect?model={args.model}", bodies, args.concurrency, args.seconds, top)

    info = machine()
    size = manifest.input.size
    assert size is not None, "a detector has a fixed input size"
    markdown = (
        f"# /v1/detect benchmark ({args.model})\n\n{info['date']}, {info['cpus']} CPUs, onnxruntime "
        f"{info['onnxruntime']}, {args.seconds:g} s per row, the {len(bodies)} held-out facemask test JPEGs "
        f"(mostly 400 px wide) sent as raw bodies over keep-alive HTTP/1.1, letterboxed to {size[1]}x{size[0]}; "
        f"default thresholds.\n`of_ceiling` = requests/s over the faster bare ONNX Runtime loop in the same "
        f"run.\n\n{markdown_table(rows)}\n"
    )
    name = common.results_name("detect", args.model, DEFAULT_MODEL)
    write_results(name, {"machine": info, "model": args.model, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
