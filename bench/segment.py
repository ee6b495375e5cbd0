"""/v1/segment over real HTTP vs bare ONNX Runtime on the same model, in one run.

    python -m bench.segment [--model pennfudan-unet] [--seconds 10]

The 50 Penn-Fudan test photos (whole, as JPEG bodies) go to the service at concurrency 1, 4 and
8 for each output format. The ceilings, measured in the same run: ONNX Runtime looping over
the already pre-processed tensors (each photo at its serving size, batch 1: the photos differ
in size, so the micro-batcher cannot merge them), and the same numpy pipeline the service runs
(decode -> resize -> pad -> ORT -> resize logits -> argmax -> PNG) in one process without
HTTP. Results go to bench/results/segment.{json,md}
(segment-<model>.* for another --model).
"""

from __future__ import annotations

import time

from bench import common
from bench.common import DATASETS, ArgumentParser, ServiceProcess, http_rows, machine, markdown_table, write_results
from service.images import decode_for_graph, decode_image
from service.runtime import OnnxModel
from service.tasks import segmentation

DEFAULT_MODEL = "pennfudan-unet"


def timed_loop(work, items: list, seconds: float) -> float:
    """Items per second of ``work(item)`` cycling over ``items`` for ``seconds``."""
    for item in items[:3]:
        work(item)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work(items[done % len(items)])
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=common.positive(float), default=10.0)
    parser.add_argument("--concurrency", type=common.positive(int), nargs="+", default=[1, 4, 8])
    parser.add_argument("--formats", nargs="+", default=["png", "json"], choices=["png", "json", "overlay"])
    args = parser.parse_args()

    folder, manifest = common.served_model(args.model, "segmentation")
    images = DATASETS / "pennfudan" / "images"
    photos = common.dataset_photos(sorted(images.iterdir())[-50:] if images.is_dir() else [], images)
    bodies = [p.read_bytes() for p in photos]
    max_side = manifest.defaults.get("max_side")
    draft = (max_side, max_side) if max_side else None
    tensors = [segmentation.preprocess(decode_image(b, 10**8, manifest.input.color, draft), manifest) for b in bodies]
    model = OnnxModel(
        folder / manifest.file, manifest.input.name, list(manifest.outputs.values()), common.service_settings().intra_op_threads
    )

    def pipeline(body: bytes) -> bytes:
        decoded = decode_for_graph(body, 10**8, manifest.input.color, draft, keep_photo=False)
        width, height = segmentation.model_size(*decoded.image.size, max_side)
        (logits,) = model.run(segmentation.preprocess(decoded.image, manifest))
        labels = segmentation.labels_from_logits(logits[0], (height, width), decoded.span)
        return segmentation.palette_png(labels)

    bare = timed_loop(model.run, tensors, args.seconds)
    numpy_pipeline = timed_loop(pipeline, bodies, args.seconds)
    shapes = sorted({t.shape[-2:] for t in tensors})
    rows: list[dict[str, object]] = [
        {
            "setup": setup,
            "concurrency": "-",
            "rps": round(value, 1),
            "p50_ms": "-",
            "p99_ms": "-",
            "errors": 0,
            "of_ceiling": round(value / bare, 3),
        }
        for setup, value in (("bare ONNX Runtime, batch 1", bare), ("same pipeline in-process, no HTTP (png)", numpy_pipeline))
    ]
    with ServiceProcess() as service:
        for output in args.formats:
            rows += http_rows(
                f"service, format={output}",
                [service],
                f"/v1/segment?model={args.model}&format={output}",
                bodies,
                args.concurrency,
                args.seconds,
                bare,
            )

    info = machine()
    sizes = f"{shapes[0][0]}x{shapes[0][1]} to {shapes[-1][0]}x{shapes[-1][1]}"
    markdown = (
        f"# /v1/segment benchmark ({args.model})\n\n{info['date']}, {info['cpus']} CPUs, onnxruntime "
        f"{info['onnxruntime']}, {args.seconds:g} s per row, the {len(bodies)} Penn-Fudan test photos (whole JPEGs; "
        f"graph inputs {sizes} after scaling the longer side to {max_side} and padding to the stride) sent as raw "
        f"bodies over keep-alive HTTP/1.1; the label map comes back at the photo's full size.\n"
        f"`of_ceiling` = requests/s over bare ONNX Runtime (batch 1) in the same run.\n\n{markdown_table(rows)}\n"
    )
    name = common.results_name("segment", args.model, DEFAULT_MODEL)
    write_results(name, {"machine": info, "model": args.model, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
