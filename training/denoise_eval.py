"""Denoiser evaluation: PSNR and SSIM on Set12, BSD68 and CBSD68 with BM3D on the same noisy images.

    python -m training.denoise_eval --model models/bsd-dncnn            # the model and BM3D, one run
    python -m training.denoise_eval --bm3d-only                         # fill the BM3D cache

Protocol (as the DnCNN / Noise2Void papers): additive white Gaussian noise of standard deviation
``sigma`` (on the 0..255 scale) added to the clean test image, *not* clipped or quantised; the
noise of each image is drawn from a generator seeded by (noise seed, sigma, image name), so every
run, model and baseline sees the same noisy images. The model runs under ONNX Runtime through the
service's own tiling code (``service/tasks/denoising.py``); every output, the model's and BM3D's,
is rounded and clipped to 8 bits (what a PNG carries) before PSNR (peak 255) and SSIM (Gaussian
window 11, sigma 1.5, ``torchmetrics``; the mean over channels for colour). BM3D (the ``bm3d``
package, profile ``np``; CBM3D in the opponent colour space for colour) runs on the same float
noisy images with the true sigma; its outputs are cached under ``runs/bm3d-cache`` keyed by the
image's hash, sigma, noise seed, bm3d version and a hash of the noisy input, so a rerun reuses them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.manifest import Manifest
from service.tasks import denoising
from training.files import durable_write

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "denoising"
# set -> (colour, sigmas); the protocol.
SETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "Set12": ("GRAY", (15, 25, 50)),
    "BSD68": ("GRAY", (15, 25, 50)),
    "CBSD68": ("RGB", (25,)),
}
NOISE_SEED = 0
PUBLISHED = {  # DnCNN-S (Zhang et al. 2017, Table II/III) and BM3D as published there, for the card
    ("BSD68", 15): (31.73, 31.07),
    ("BSD68", 25): (29.23, 28.57),
    ("BSD68", 50): (26.23, 25.62),
    ("Set12", 15): (32.86, 32.37),
    ("Set12", 25): (30.44, 29.97),
    ("Set12", 50): (27.18, 26.72),
}


@dataclass
class TestImage:
    name: str
    clean: np.ndarray  # H x W x C uint8

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.clean.tobytes() + str(self.clean.shape).encode()).hexdigest()


def load_set(name: str, root: Path = DATA, limit: int | None = None) -> list[TestImage]:
    color = SETS[name][0] if name in SETS else "GRAY"
    paths = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in (".png", ".bmp", ".jpg", ".tif"))[:limit]
    images = []
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if color == "RGB" else "L"))
        images.append(TestImage(path.stem, pixels if pixels.ndim == 3 else pixels[:, :, None]))
    return images


def add_noise(image: TestImage, sigma: float, seed: int = NOISE_SEED) -> np.ndarray:
    """The noisy image in [0, 1] scale (float32, unclipped), the same for every run with this seed."""
    rng = np.random.default_rng([seed, round(sigma * 100), zlib.crc32(image.name.encode())])
    noise = rng.standard_normal(image.clean.shape, dtype=np.float32) * np.float32(sigma / 255)
    return image.clean.astype(np.float32) / np.float32(255) + noise


def psnr(clean: np.ndarray, output: np.ndarray) -> float:
    mse = float(np.mean((clean.astype(np.float64) - output.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def ssim(clean: np.ndarray, output: np.ndarray) -> float:
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None]

    score = structural_similarity_index_measure(tensor(output), tensor(clean), data_range=255.0)
    assert isinstance(score, torch.Tensor)  # (the full-image variant would be a pair)
    return float(score)


def bm3d_version() -> str:
    return importlib.metadata.version("bm3d")


def bm3d_denoise(
    image: TestImage, noisy: np.ndarray, sigma: float, cache: Path, seed: int = NOISE_SEED, cached_only: bool = False
) -> np.ndarray | None:
    """BM3D (CBM3D for colour) of ``noisy`` as 8-bit, from the cache when this exact input ran before.

    ``cached_only``: None instead of running BM3D when the cache has no result yet.
    """
    noisy_hash = hashlib.sha256(noisy.tobytes()).hexdigest()[:8]
    path = cache / f"{image.digest[:16]}-s{sigma:g}-seed{seed}-bm3d{bm3d_version()}-{noisy_hash}.png"
    if path.exists():
        with Image.open(path) as done:
            pixels = np.asarray(done)
        return pixels if pixels.ndim == 3 else pixels[:, :, None]
    if cached_only:
        return None
    import bm3d

    out = bm3d.bm3d_rgb(noisy, sigma / 255) if noisy.shape[2] == 3 else bm3d.bm3d(noisy[:, :, 0], sigma / 255)[:, :, None]
    pixels = denoising.to_uint8(np.asarray(out, np.float32))
    cache.mkdir(parents=True, exist_ok=True)
    result = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    durable_write(path, functools.partial(result.save, format="PNG"))
    return pixels


def onnx_denoiser(model_dir: Path, threads: int = 1) -> tuple[Manifest, Callable[[np.ndarray], np.ndarray]]:
    """The exported graph under ONNX Runtime as ``noisy [H, W, C] float in [0, 1] -> uint8``, tiled as served."""
    from service.runtime import OnnxModel

    manifest = Manifest.read(model_dir)
    model = OnnxModel(model_dir / manifest.file, manifest.input.name, [manifest.outputs["image"]], threads)

    def run(noisy: np.ndarray) -> np.ndarray:
        return denoising.Tiler(noisy, manifest).run(lambda batch: model.run(batch)[0])

    return manifest, run


def evaluate(
    denoise: Callable[[np.ndarray], np.ndarray] | None,
    sets: dict[str, tuple[str, tuple[int, ...]]] = SETS,
    root: Path = DATA,
    bm3d_cache: Path | None = Path("runs/bm3d-cache"),
    limit: int | None = None,
    bm3d_limit: int | None = None,
    seed: int = NOISE_SEED,
    cached_only: bool = False,
) -> list[dict[str, object]]:
    """One row per (set, sigma): the model's and BM3D's mean PSNR / SSIM on the same noisy images.

    ``bm3d_limit`` runs BM3D on the first N images only (it is slow), ``cached_only`` on those whose
    result is cached; the row then also gives the model's PSNR on that same subset, like for like.
    """
    rows: list[dict[str, object]] = []
    for set_name, (_, sigmas) in sets.items():
        images = load_set(set_name, root, limit)
        for sigma in sigmas:
            row: dict[str, object] = {"set": set_name, "sigma": sigma, "images": len(images)}
            model_scores: list[tuple[float, float]] = []
            bm3d_scores: dict[int, tuple[float, float]] = {}
            started = time.perf_counter()
            for index, image in enumerate(images):
                noisy = add_noise(image, sigma, seed)
                if denoise is not None:
                    out = denoise(noisy)
                    model_scores.append((psnr(image.clean, out), ssim(image.clean, out)))
                if bm3d_cache is not None and (bm3d_limit is None or index < bm3d_limit):
                    classical = bm3d_denoise(image, noisy, sigma, bm3d_cache, seed, cached_only)
                    if classical is not None:
                        bm3d_scores[index] = (psnr(image.clean, classical), ssim(image.clean, classical))
            if model_scores:
                row["psnr"], row["ssim"] = (round(float(v), 4) for v in np.mean(model_scores, axis=0))
            if bm3d_scores:
                row["bm3d_images"] = len(bm3d_scores)
                row["bm3d_psnr"], row["bm3d_ssim"] = (round(float(v), 4) for v in np.mean(list(bm3d_scores.values()), axis=0))
                if model_scores and len(bm3d_scores) < len(model_scores):
                    same = [model_scores[i][0] for i in bm3d_scores]
                    row["psnr_on_bm3d_images"] = round(float(np.mean(same)), 4)
            if (set_name, sigma) in PUBLISHED:
                row["dncnn_s_published"], row["bm3d_published"] = PUBLISHED[(set_name, sigma)]
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: the model vs BM3D (same noisy images, this run) and the published numbers."""
    lines = [
        "| set | sigma | images | this model PSNR / SSIM | BM3D PSNR / SSIM (this run) | model - BM3D "
        "| DnCNN-S published | BM3D published |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        model = f"{r['psnr']:.2f} / {r['ssim']:.4f}" if "psnr" in r else "-"
        bm3d, gap = "-", "-"
        if "bm3d_psnr" in r:
            subset = "" if r["bm3d_images"] == r["images"] else f" ({r['bm3d_images']} images)"
            bm3d = f"{r['bm3d_psnr']:.2f} / {r['bm3d_ssim']:.4f}{subset}"
            if "psnr" in r:
                same = r.get("psnr_on_bm3d_images", r["psnr"])
                gap = f"{float(same) - float(r['bm3d_psnr']):+.2f} dB"  # type: ignore[arg-type]
        published = (f"{r['dncnn_s_published']:.2f}", f"{r['bm3d_published']:.2f}") if "dncnn_s_published" in r else ("-", "-")
        lines.append(f"| {r['set']} | {r['sigma']} | {r['images']} | {model} | {bm3d} | {gap} | {' | '.join(published)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.denoise_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (model.json + model.onnx)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="holds Set12/, BSD68/, CBSD68/")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--sigmas", type=int, nargs="+", help="override every set's sigmas")
    parser.add_argument("--bm3d-only", action="store_true", help="only BM3D (fills the cache)")
    parser.add_argument("--no-bm3d", action="store_true")
    parser.add_argument("--bm3d-cache", type=Path, default=Path("runs/bm3d-cache"))
    parser.add_argument("--bm3d-limit", type=int, default=None, help="BM3D on the first N images of each set only")
    parser.add_argument("--bm3d-cached-only", action="store_true", help="BM3D only where the cache has it")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    sets = {name: (SETS[name][0], tuple(args.sigmas) if args.sigmas else SETS[name][1]) for name in args.sets}
    denoise = None
    if not args.bm3d_only:
        if args.model is None:
            parser.error("--model is needed unless --bm3d-only")
        denoise = onnx_denoiser(args.model, args.threads)[1]
    cache = None if args.no_bm3d else args.bm3d_cache
    rows = evaluate(denoise, sets, args.data_dir, cache, args.limit, args.bm3d_limit, cached_only=args.bm3d_cached_only)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
