"""/v1/denoise over real HTTP vs bare ONNX Runtime on the same model, in one run, in megapixels/s.

    python -m bench.denoise [--model bsd-denoiser-unet] [--seconds 10] [--color]

Inputs: the 68 BSD68 photos (481x321, grayscale; with ``--color`` the CBSD68 colour photos) with
Gaussian noise (sigma 25), as PNG bodies, and one large photo (one of them scaled to 3000x2000 =
6 MP) that the service must tile. A grayscale model runs a colour photo as three samples. The
ceilings, measured in the same run: ONNX Runtime looping over the already prepared tensors
(each photo padded to the stride, batch 1), and the same numpy pipeline the service runs
(PNG decode -> tiles -> ORT -> stitch -> PNG encode) in one process without HTTP. The service
rows load /v1/denoise at concurrency 1 and 4. Results go to bench/results/denoise.{json,md}
(``--color``: denoise-color-MODEL.{json,md}).
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from bench import common
from bench.common import DATASETS, ArgumentParser, ServiceProcess, machine, markdown_table, write_results
from bench.loadgen import build_request, run_load
from service.images import decode_image, to_array
from service.runtime import OnnxModel
from service.tasks import denoising

DEFAULT_MODEL = "bsd-denoiser-unet"


def noisy_png(image: Image.Image, seed: int) -> bytes:
    pixels = np.asarray(image, np.float64)
    noisy = np.clip(pixels + np.random.default_rng(seed).normal(0, 25, pixels.shape) + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(work, items: list, seconds: float, pixels: list[int]) -> float:
    """Megapixels per second of ``work(item)`` cycling over ``items`` for ``seconds`` (at least one pass)."""
    work(items[0])
    done = count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or count == 0:
        work(items[count % len(items)])
        done += pixels[count % len(items)]
        count += 1
    return done / 1e6 / (time.perf_counter() - started)


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=common.positive(float), default=10.0)
    parser.add_argument("--concurrency", type=common.positive(int), nargs="+", default=[1, 4])
    parser.add_argument("--color", action="store_true", help="colour photos (CBSD68) instead of grayscale ones (BSD68)")
    args = parser.parse_args()

    folder, manifest = common.served_model(args.model, "denoising")
    color, photo_set = ("RGB", "CBSD68") if args.color else ("GRAY", "BSD68")
    where = DATASETS / "denoising" / photo_set
    paths = common.dataset_photos(sorted(where.iterdir()) if where.is_dir() else [], where)
    photos = [Image.open(path).convert("L" if color == "GRAY" else "RGB") for path in paths]
    bodies = [noisy_png(photo, i) for i, photo in enumerate(photos)]
    large = noisy_png(photos[10].resize((3000, 2000), Image.Resampling.BICUBIC), 99)
    model = OnnxModel(
        folder / manifest.file, manifest.input.name, [manifest.outputs["image"]], common.service_settings().intra_op_threads
    )

    def prepared(body: bytes) -> np.ndarray:
        tiler = denoising.Tiler(to_array(decode_image(body, 10**8, color)), manifest)
        return next(tiler.batches())[1]

    def pipeline(body: bytes) -> bytes:
        tiler = denoising.Tiler(to_array(decode_image(body, 10**8, color)), manifest)
        return denoising.encode_png(tiler.run(lambda batch: model.run(batch)[0]))

    sizes = [photo.size[0] * photo.size[1] for photo in photos]
    tensors = [prepared(body) for body in bodies]
    rows: list[dict[str, object]] = []

    def add(setup: str, images: str, value: float, ceiling: float, concurrency: object = "-", extra: dict | None = None) -> None:
        rows.append(
            {
                "setup": setup,
                "images": images,
                "concurrency": concurrency,
                "MP_per_s": round(value, 3),
                "of_ceiling": round(value / ceiling, 3),
                **(extra or {"p50_ms": "-", "errors": 0}),
            }
        )

    bare = timed(model.run, tensors, args.seconds, sizes)
    add("bare ONNX Runtime, batch 1", f"{photo_set} 481x321", bare, bare)
    add("same pipeline in-process, no HTTP", f"{photo_set} 481x321", timed(pipeline, bodies, args.seconds, sizes), bare)
    large_pixels = [3000 * 2000]
    add("same pipeline in-process, no HTTP", "6 MP, tiled", timed(pipeline, [large], args.seconds, large_pixels), bare)

    with ServiceProcess() as service:
        for images, payloads, pixels in ((f"{photo_set} 481x321", bodies, sizes), ("6 MP, tiled", [large], large_pixels)):
            path = f"/v1/denoise?model={args.model}"
            requests = [build_request("127.0.0.1", service.port, path, body, "image/png") for body in payloads]
            run_load("127.0.0.1", [service.port], requests, 2, 2.0)  # warm-up
            for concurrency in args.concurrency:
                result = run_load("127.0.0.1", [service.port], requests, concurrency, args.seconds).check(path)
                mp = result.requests * float(np.mean(pixels)) / 1e6 / result.seconds
                add(
                    "service over HTTP",
                    images,
                    mp,
                    bare,
                    concurrency,
                    {"p50_ms": round(result.percentile(50), 1), "errors": result.errors},
                )

    info = machine()
    markdown = (
        f"# /v1/denoise benchmark ({args.model})\n\n{info['date']}, {info['cpus']} CPUs "
        f"(load average {info['load_1min']} at the start), "
        f"onnxruntime {info['onnxruntime']}, {args.seconds:g} s per row. Noisy (sigma 25) {photo_set} PNG bodies over "
        f"keep-alive HTTP/1.1; the answer is a PNG of the same size. `of_ceiling` = megapixels/s over bare ONNX Runtime "
        f"(batch 1, pre-processed {photo_set} tensors) in the same run. Tiles: {manifest.defaults.get('tile')} px, overlap "
        f"{manifest.defaults.get('overlap')} px.\n\n{markdown_table(rows)}\n"
    )
    name = f"denoise-color-{args.model}" if args.color else common.results_name("denoise", args.model, DEFAULT_MODEL)
    write_results(name, {"machine": info, "model": args.model, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
