"""Denoiser recipe: a residual CNN trained supervised (blind Gaussian) or self-supervised (Noise2Void).

    python -m training denoiser --mode supervised --name bsd-denoiser-unet --threads 1
    python -m training denoiser --mode n2v --noise-sigma 25 --name bsd-n2v-unet --threads 1
    python -m training denoiser --mode n2v --noisy-dir path/to/my_noisy_photos --name my-n2v

supervised: random patches of the clean ``--data-dir`` images (Train400) with Gaussian noise
drawn on the fly, sigma uniform in 0..``--sigma-max`` per patch (one blind model for all levels),
half of the patches clipped and quantised to 8 bits as a real upload is; loss: squared error to
the clean patch. n2v: Noise2Void (Krull et al., 2019) on noisy images only, either a user's
``--noisy-dir`` or a fixed noisy copy of the training images at ``--noise-sigma`` written once to
``runs/<name>/noisy-s<sigma>-...`` (the clean training images are read once to make it, never by training);
about ``--mask-fraction`` of each patch's pixels (stratified) are replaced by a random other
neighbour and the loss is the squared error at those pixels only. Its export blends the noisy
input back in with the weight that minimises SURE at ``--noise-sigma`` (``--blend``).

Both: grayscale, or RGB with ``--color`` (several ``--data-dir`` folders of colour photos,
``--reduce`` to shrink JPEGs); ``--init-from`` starts from an exported model folder (a grayscale
one is inflated into a colour network). The last ``--val-count`` images are held out for
per-epoch validation PSNR; the test sets are measured once, after export, by
``training/denoise_eval.py`` (with BM3D).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2.functional import rgb_to_grayscale

from service.manifest import MAX_TILE, InputSpec, Manifest, Task
from service.settings import DEFAULT_MODELS
from service.tasks import denoising
from training import denoise_eval
from training.datasets.denoising import (
    image_paths,
    n2v_mask,
    noisy_version,
    random_patches,
    read_image,
    split_clean,
    stack,
    write_noisy_copy,
)
from training.engine import FitResult, bf16_autocast, fit, start_run, warmup_cosine
from training.export import (
    OrtParity,
    ParityError,
    export_onnx,
    fit_record,
    load_exported_weights,
    metrics_table,
    provenance,
    write_model_folder,
)
from training.nets.dncnn import Blended, DihedralAveraged, build, inflate

TOLERANCE = 1e-3  # |PyTorch - ONNX Runtime| on [0, 1] pixels: a quarter of one 8-bit level
VAL_SIGMAS = (15, 25, 50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["supervised", "n2v"], default="supervised")
    train400 = Path("../shared/datasets/denoising/Train400")
    parser.add_argument("--data-dir", type=Path, nargs="+", default=[train400], help="folders of clean images")
    parser.add_argument("--color", action="store_true", help="an RGB model (noise independent per channel); else grayscale")
    parser.add_argument("--reduce", type=int, default=1, help="shrink clean training photos by this factor (JPEG photos: 2)")
    parser.add_argument("--noisy-dir", type=Path, default=None, help="n2v: train on these noisy images (else a noisy copy)")
    parser.add_argument(
        "--noise-sigma",
        type=float,
        default=None,
        help="n2v: sigma of the synthesised noisy copy (default 25), or of the --noisy-dir photos (the one --blend assumes)",
    )
    parser.add_argument("--sigma-max", type=float, default=55.0, help="supervised: noise sigma drawn from 0..this")
    parser.add_argument("--clip-fraction", type=float, default=0.5, help="supervised: share of patches clipped to 8 bits")
    parser.add_argument(
        "--gray-fraction",
        type=float,
        default=0.2,
        help="supervised --color: share of patches made gray with the same noise in every channel (a grayscale photo "
        "sent to a colour model arrives replicated like that)",
    )
    parser.add_argument("--mask-fraction", type=float, default=0.002, help="n2v: share of blind-spot pixels per patch")
    parser.add_argument("--mask-radius", type=int, default=2, help="n2v: replacements come from a (2r+1)^2 neighbourhood")
    parser.add_argument("--name", default="bsd-denoiser-unet")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="the model repository the service reads")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and logs")
    parser.add_argument("--arch", choices=["unet", "dncnn"], default="unet")
    parser.add_argument("--width", type=int, default=32, help="unet: widths w, 2w, 4w; dncnn: channels")
    parser.add_argument("--depth", type=int, default=2, help="unet: convs per scale and side; dncnn: layers")
    parser.add_argument(
        "--predict",
        choices=["noise", "clean"],
        default=None,
        help="what the network outputs: the noise (residual; supervised default) or the clean image (n2v default)",
    )
    parser.add_argument(
        "--self-ensemble", action="store_true", help="export the mean over the 8 flips/transpositions (8x the compute)"
    )
    parser.add_argument(
        "--blend",
        choices=["sure", "none"],
        default="sure",
        help="n2v: blend the noisy input back into the output with the SURE-optimal weight at --noise-sigma",
    )
    parser.add_argument("--init-from", type=Path, default=None, help="start from this exported model folder's weights")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patches-per-image", type=int, default=16, help="patches per training image per epoch")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate (warm-up, then cosine)")
    parser.add_argument(
        "--val-count",
        type=int,
        default=None,
        help="last N clean --data-dir images held out for validation (default 20; 0 with --noisy-dir, which has no clean one)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N images (smoke runs)")
    parser.add_argument("--tile", type=int, default=512, help="serving: tile size (manifest default)")
    parser.add_argument("--overlap", type=int, default=32, help="serving: overlap margin per side (manifest default)")
    parser.add_argument(
        "--bm3d", choices=["run", "cached", "none"], default="run", help="test-set table: run BM3D, use only cached, or skip"
    )
    parser.add_argument("--test-limit", type=int, default=None, help="first N images of each test set (smoke runs)")
    parser.add_argument(
        "--test-sets",
        nargs="*",
        default=list(denoise_eval.SETS),
        choices=list(denoise_eval.SETS),
        help="measured after the export (--test-sets alone: none, e.g. your own photos without Set12/BSD68 at hand)",
    )
    parser.add_argument("--test-dir", type=Path, default=denoise_eval.DATA, help="holds Set12/, BSD68/, CBSD68/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="end after epoch N of the schedule (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (the default where the CPU has no bf16 kernels)")


class Batches:
    """One epoch of patches, drawn from a generator seeded by the epoch (a resumed run repeats them)."""

    def __init__(self, recipe: DenoiserRecipe, epoch: int) -> None:
        self.recipe = recipe
        self.generator = torch.Generator().manual_seed(recipe.args.seed * 1000 + epoch)
        self.steps = math.ceil(len(recipe.images) * recipe.args.patches_per_image / recipe.args.batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        args = self.recipe.args
        for _ in range(self.steps):
            patches = random_patches(self.recipe.images, args.batch_size, args.patch, self.generator)
            if args.mode == "n2v":
                yield (*n2v_mask(patches, args.mask_fraction, args.mask_radius, self.generator), patches)
                continue
            sigma = torch.rand(len(patches), 1, 1, 1, generator=self.generator) * (args.sigma_max / 255)
            noise = torch.randn(patches.shape, generator=self.generator)
            if self.recipe.channels == 3 and args.gray_fraction > 0:
                gray = torch.rand(len(patches), 1, 1, 1, generator=self.generator) < args.gray_fraction
                patches = torch.where(gray, rgb_to_grayscale(patches, num_output_channels=3), patches)
                noise = torch.where(gray, noise[:, :1].expand_as(noise), noise)
            noisy = patches + sigma * noise
            clip = torch.rand(len(patches), 1, 1, 1, generator=self.generator) < args.clip_fraction
            noisy = torch.where(clip, (noisy.clamp(0, 1) * 255).round() / 255, noisy)
            yield noisy, None, patches


class DenoiserRecipe:
    def __init__(self, args: argparse.Namespace, images: list[np.ndarray], val_clean: list[tuple[str, np.ndarray]]) -> None:
        self.args = args
        self.images = stack(images)
        self.autocast = bf16_autocast(args.no_bf16)
        self.channels = 3 if args.color else 1
        self.model = build(args.arch, self.channels, args.width, args.depth, predicts_noise(args))
        self.initial: Manifest | None = None
        if args.init_from:
            self.initial = self.start_from(args.init_from)
        self.model.to(memory_format=torch.channels_last)  # in place
        self.blend_weight: float | None = None  # set at export (n2v with --blend sure)
        self.stride = self.model.stride
        if args.patch % self.stride:  # the U-Net joins each up-sampled map to its skip: else the first step fails
            raise SystemExit(f"--patch {args.patch}: a multiple of {self.stride}, the stride of the {args.arch}")
        self.val_sigmas = (args.noise_sigma,) if args.mode == "n2v" else VAL_SIGMAS
        # Held-out validation: whole images, fixed noise (the same every epoch and run). A colour model is
        # also validated on gray versions (one channel, replicated), as grayscale photos reach it.
        self.val = {
            f"psnr{sigma:g}": [(clean, noisy_version(clean, sigma, 12345, name)) for name, clean in val_clean]
            for sigma in self.val_sigmas
        }
        if self.channels == 3 and args.mode == "supervised":
            gray_clean = [(name, clean.mean(0, keepdims=True)) for name, clean in val_clean]
            for sigma in self.val_sigmas:
                self.val[f"gray_psnr{sigma:g}"] = [
                    (clean, np.repeat(noisy_version(clean, sigma, 12345, name), 3, 0)) for name, clean in gray_clean
                ]
        self.total_steps = len(Batches(self, 0)) * args.epochs
        self.step = 0
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)

    def start_from(self, folder: Path) -> Manifest:
        """Load an exported model's weights; a grayscale model's into a colour network through :func:`inflate`."""
        channels = Manifest.read(folder).input.channels
        args = self.args
        source = build(args.arch, channels, args.width, args.depth, self.model.residual)
        initial = load_exported_weights(source, folder)
        residual = initial.training.get("residual", initial.training.get("mode") == "supervised")
        if residual != self.model.residual:
            kind = "noise" if residual else "clean"
            raise SystemExit(f"{folder} predicts the {kind} pixels: use --predict {kind}")
        self.model.load_state_dict(inflate(source.state_dict(), self.model.state_dict()))
        return initial

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, int(0.03 * self.total_steps), self.total_steps)

    def train_batches(self, epoch: int) -> Batches:
        return Batches(self, epoch)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]) -> dict[str, float]:
        inputs, mask, target = batch
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.lr_factor(self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            output = self.model(inputs.contiguous(memory_format=torch.channels_last)).float()
        error = (output - target) ** 2
        # n2v: only the blind spots carry a loss (their noisy value was hidden from the input).
        loss = error[mask.expand_as(error)].mean() if mask is not None else error.mean()  # one mask for every channel
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item() * 255**2}  # in squared 8-bit levels: readable next to sigma^2

    def end_epoch(self, epoch: int) -> None:
        pass

    def served(self) -> nn.Module:
        network = DihedralAveraged(self.model) if self.args.self_ensemble else self.model
        return network if self.blend_weight is None else Blended(network, self.blend_weight)

    def evaluate(self) -> dict[str, float]:
        return self.validate(self.model)

    @torch.no_grad()
    def validate(self, module: nn.Module) -> dict[str, float]:
        """Mean PSNR of ``module`` on the held-out images at each validation sigma."""
        module.eval()
        result = {}
        for key, pairs in self.val.items():
            if not pairs:  # a user's noisy photos only: nothing clean to validate on
                continue
            scores = []
            for clean, noisy in pairs:
                x = torch.from_numpy(pad(noisy, self.stride))[None]
                out = module(x)[0, :, : clean.shape[1], : clean.shape[2]].numpy()
                if len(out) != len(clean):  # a gray image through a colour model: the mean, as served
                    out = out.mean(0, keepdims=True)
                scores.append(denoise_eval.psnr(to_8bit(clean), denoising.to_uint8(out)))
            result[key] = float(np.mean(scores))
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "residual": self.model.residual,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Both outputs have the same weights' shapes: only this flag tells a resumed run it would be misread.
        residual = state.get("residual", True)  # checkpoints older than the flag were residual
        if residual != self.model.residual:
            kind = "noise" if residual else "clean"
            raise SystemExit(f"the checkpoint's network predicts the {kind} pixels: resume with --predict {kind}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


@torch.no_grad()
def sure_blend_weight(network: nn.Module, noisy: list[torch.Tensor], sigma: float, stride: int, seed: int) -> float:
    """The weight ``w`` of ``(1 - w) * network(y) + w * y`` that minimises SURE over the ``noisy`` images.

    Stein's unbiased risk estimate needs only the noisy images and the noise level: per pixel,
    ``SURE(w) = (1 - w)^2 A - s^2 + 2 s^2 ((1 - w) D + w)`` with ``A`` the mean of ``(network(y) - y)^2``
    and ``D`` the network's divergence per pixel, estimated by Monte Carlo (Ramani et al., 2008:
    ``b . (network(y + e b) - network(y)) / e`` for Gaussian ``b``). Its minimum is at
    ``w = 1 - s^2 (1 - D) / A``, clipped to [0, 1]. No clean pixel is read.
    """
    network.eval()
    generator = torch.Generator().manual_seed(seed)
    variance, epsilon = (sigma / 255) ** 2, 1e-3
    squared = divergence = pixels = 0.0
    for image in noisy:
        y = torch.from_numpy(pad(image.numpy(), stride))[None]
        probe = torch.randn(y.shape, generator=generator)
        out = network(y)
        squared += float(((out - y) ** 2).sum())
        divergence += float((probe * (network(y + epsilon * probe) - out)).sum()) / epsilon
        pixels += y.numel()
    weight = 1 - variance * (1 - divergence / pixels) / (squared / pixels)
    return min(1.0, max(0.0, weight))


def predicts_noise(args: argparse.Namespace) -> bool:
    """Residual learning suits supervised training; Noise2Void predicts the clean pixel (its centre input is a neighbour's)."""
    return args.predict == "noise" if args.predict else args.mode == "supervised"


def pad(image: np.ndarray, stride: int) -> np.ndarray:
    """``C x H x W`` reflect-padded at the bottom and right to multiples of ``stride`` (as the service pads)."""
    height, width = image.shape[-2:]
    return np.pad(image, ((0, 0), (0, -height % stride), (0, -width % stride)), mode="reflect")


def to_8bit(image: np.ndarray) -> np.ndarray:
    return denoising.to_uint8(image)


@torch.enable_grad()
def receptive_radius(network: nn.Module, channels: int, stride: int) -> int:
    """How far (px) an output pixel sees, measured: the reach of the input gradient of a stride x stride block of
    centre outputs (a strided net's reach depends on the pixel's phase), on two random inputs, so that no path is
    cut by a ReLU that happens to be off. Any architecture, any depth: the serving overlap must cover it or tiles
    leave seams."""
    side = 64 * stride
    while True:
        probe = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(0), requires_grad=True)
        centre = slice(side // 2, side // 2 + stride)
        network(probe)[..., centre, centre].sum().backward()
        assert probe.grad is not None
        seen = torch.nonzero(probe.grad.abs().sum(dim=(0, 1)))  # (row, column) of every input pixel that counts
        reach = max(centre.start - int(seen.min()), int(seen.max()) - (centre.stop - 1))
        if reach < side // 2 - stride:  # it fits inside the probe: measured, not cut off by its border
            return reach
        side *= 2


def make_manifest(args: argparse.Namespace, stride: int, overlap: int, tile: int) -> Manifest:
    channels = 3 if args.color else 1
    return Manifest(
        name=args.name,
        task=Task.denoising,
        version="1",
        sha256="0" * 64,
        input=InputSpec(
            name="input",
            color="RGB" if args.color else "GRAY",
            size=None,
            resize="none",
            mean=[0.0] * channels,
            std=[1.0] * channels,
        ),
        outputs={"image": "image"},
        defaults={"tile": tile, "overlap": overlap, "stride": stride, "pad": "reflect"},
    )


def export(recipe: DenoiserRecipe, args: argparse.Namespace, fitted: FitResult, train_images: int) -> dict[str, Any]:
    """Export with dynamic H and W, check parity, measure the test sets (with BM3D), write the model folder."""
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    blend: dict[str, float] = {}
    if args.mode == "n2v" and args.blend == "sure":
        network = recipe.served()
        recipe.blend_weight = sure_blend_weight(network, recipe.images, args.noise_sigma, recipe.stride, args.seed)
        before, after = recipe.validate(network), recipe.validate(recipe.served())
        blend = {"blend_weight": round(recipe.blend_weight, 4)}
        blend.update({f"val_{key}_network": value for key, value in before.items()})
        blend.update({f"val_{key}_blended": value for key, value in after.items()})
        print(f"SURE blend weight {recipe.blend_weight:.4f}: validation {before} -> {after}")
    served = recipe.served().eval().float().to(memory_format=torch.contiguous_format)
    stride = recipe.stride
    example = torch.zeros(1, recipe.channels, 8 * stride, 12 * stride)
    export_onnx(served, example, onnx_path, output_names=["image"], dynamic_spatial=True)

    # Parity on held-out noisy images at their own size, and a batch of two: the graph takes any H, W and N.
    parity = OrtParity(served, onnx_path, TOLERANCE)
    samples = [noisy for pairs in recipe.val.values() for _, noisy in pairs[:4]] or [i.numpy() for i in recipe.images[:4]]
    for noisy in samples:
        parity.run(torch.from_numpy(pad(noisy, stride))[None])
    if len(samples) >= 2 and samples[0].shape == samples[1].shape:
        parity.run(torch.from_numpy(np.stack([pad(noisy, stride) for noisy in samples[:2]])))
    parity.check()

    # Tiles keep `overlap` px of context on each inner side: at least the network's reach, on the stride's grid.
    radius = receptive_radius(served, recipe.channels, stride)
    overlap = max(args.overlap, -(-radius // stride) * stride)
    if overlap > args.overlap:
        print(f"the network sees {radius} px around a pixel: tiles overlap by {overlap} px, not --overlap {args.overlap}")
    # The service keeps at most a third of a tile as overlap: a smaller tile would cut the context and show seams.
    tile = max(args.tile, denoising.round_up(3 * overlap, stride))
    if tile > args.tile:
        print(f"tiles of {tile} px, not --tile {args.tile}: the service keeps at most a third of a tile as overlap")
    manifest = make_manifest(args, stride, overlap, tile)
    folder = args.models_dir / args.name
    staging = run_dir / "measured"  # the served folder is written once, complete, after the measurements
    write_model_folder(staging, onnx_path, manifest, "", None)
    sets = {name: denoise_eval.SETS[name] for name in args.test_sets}
    if args.mode == "n2v":  # trained for one noise level: measured at that level only
        sigma = int(args.noise_sigma) if args.noise_sigma.is_integer() else args.noise_sigma  # 25, not 25.0, in keys
        sets = {name: (color, (sigma,)) for name, (color, _) in sets.items()}
    _, denoise = denoise_eval.onnx_denoiser(staging, threads=torch.get_num_threads())
    rows = denoise_eval.evaluate(
        denoise,
        sets,
        args.test_dir,
        None if args.bm3d == "none" else args.runs_dir / "bm3d-cache",
        args.test_limit,
        cached_only=args.bm3d == "cached",
    )
    per_channel = "" if args.color else ", each channel through this grayscale model"
    metrics: dict[str, Any] = {
        "dataset": "denoising: "
        + ", ".join(f"{n} ({'colour' + per_channel if c == 'RGB' else 'gray'})" for n, (c, _) in sets.items()),
        "split": "test",
        "protocol": f"AWGN, unclipped float noisy input, noise seed {denoise_eval.NOISE_SEED}; output rounded to 8 bits",
    }
    for row in rows:
        key = f"{row['set']}_s{row['sigma']}"
        metrics[f"psnr_{key}"] = row["psnr"]
        metrics[f"ssim_{key}"] = row["ssim"]
        if "bm3d_psnr" in row:
            metrics[f"bm3d_psnr_{key}"] = row["bm3d_psnr"]
    metrics["parity_max_abs_diff"] = parity.max_abs_diff
    metrics.update(blend)
    manifest.metrics = metrics
    manifest.training = fit_record(
        args,
        fitted,
        training_data(args),
        mode=args.mode,
        train_images=train_images,
        arch=args.arch,
        width=args.width,
        depth=args.depth,
        residual=recipe.model.residual,
        **({"init_from": initial_record(args.init_from, recipe.initial)} if recipe.initial else {}),
    )
    card = model_card(args, manifest, recipe, onnx_path, rows, radius)
    curves = run_dir / "curves.png"
    if not curves.exists() and args.init_from:  # no epoch trained here: the initial model's curves are the story
        curves = args.init_from / "curves.png"
    write_model_folder(folder, onnx_path, manifest, card, curves)
    (run_dir / "test_rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    return metrics


def training_data(args: argparse.Namespace) -> str | None:
    """What the record names as the data: a user's noisy photos, and the clean images validation read (if any)."""
    if not (args.mode == "n2v" and args.noisy_dir):
        return None  # the --data-dir folders
    return f"{args.noisy_dir}" + (f" (validation: {args.data_dir})" if args.val_count else "")


def initial_record(folder: Path, initial: Manifest) -> dict[str, object]:
    """What a fine-tuned model started from: the folder, its graph's hash and how it was trained."""
    earlier = initial.training
    return {
        "model": str(folder),
        "sha256": initial.sha256,
        "seconds": earlier.get("seconds"),
        "command": earlier.get("command"),
        "commit": earlier.get("commit"),
        "init_from": earlier.get("init_from"),
        "psnr": {key.removeprefix("psnr_"): value for key, value in initial.metrics.items() if key.startswith("psnr_")},
    }


def model_card(
    args: argparse.Namespace,
    manifest: Manifest,
    recipe: DenoiserRecipe,
    onnx_path: Path,
    rows: list[dict[str, object]],
    radius: int,
) -> str:
    params = sum(p.numel() for p in recipe.model.parameters())
    t = manifest.training
    if args.arch == "unet":
        net = (
            f"U-Net (`training/nets/dncnn.py`, `DenoiseUNet`): 3 scales of {args.width}/{2 * args.width}/"
            f"{4 * args.width} channels, {args.depth} conv+ReLU per scale and side ({2 * args.depth} at the bottom), "
            "strided-conv down, transposed-conv up, additive skips, no batch-norm"
        )
    else:
        net = f"DnCNN (`training/nets/dncnn.py`): {args.depth} layers of {args.width} channels with batch-norm"
    if args.self_ensemble:
        net += (
            "; the exported graph returns the mean of the network's outputs over the 8 flips and transpositions "
            "of the input (self-ensemble, `DihedralAveraged`: 8x the compute of one pass)"
        )
    reduced = ""
    if args.reduce > 1:
        reduced = f" of the photos shrunk {args.reduce}x (box filter: JPEG blocks and camera noise averaged away)"
    if args.mode == "supervised":
        how = (
            f"supervised, blind: clean patches{reduced} + Gaussian noise drawn on the fly, sigma uniform in "
            f"0..{args.sigma_max:g} per patch; {args.clip_fraction:.0%} of noisy patches clipped and quantised to 8 bits "
            "(as uploads are); loss: squared error to the clean patch"
        )
        if args.color and args.gray_fraction > 0:
            how += (
                f"; {args.gray_fraction:.0%} of the patches made gray (luma in all three channels, the same noise in "
                "each), as a grayscale photo reaches this model"
            )
    else:
        copy = f"a fixed noisy copy (sigma {args.noise_sigma:g}) of the training images"
        source = f"`{args.noisy_dir}`" if args.noisy_dir else copy
        how = (
            f"Noise2Void, self-supervised on noisy images only ({source}; the clean training images are never read "
            f"by training): per patch, a stratified {args.mask_fraction:.2%} of the pixels (one per cell of "
            f"{round(math.sqrt(1 / args.mask_fraction))}^2) replaced by a random other pixel of their "
            f"{2 * args.mask_radius + 1}x{2 * args.mask_radius + 1} neighbourhood (never another blind spot), "
            "squared-error loss on those pixels only"
        )
    output = (
        "the network predicts the noise and the graph subtracts it"
        if recipe.model.residual
        else "the network predicts the clean pixels directly"
    )
    inputs = (
        "an RGB image of any size, the noise independent in each channel; grayscale photos are replicated to the "
        "three channels and the mean of the outputs is kept"
        if args.color
        else "a grayscale image of any size; colour photos are denoised channel by channel (R, G, B each through "
        "this grayscale model)"
    )
    metrics = manifest.metrics
    if recipe.blend_weight is not None:
        sigma = f"{args.noise_sigma:g}"
        output += (
            f"; then the graph blends the noisy input back in, `(1 - w) * network(x) + w * x` with w = "
            f"{recipe.blend_weight:.4f}: the weight that minimises SURE (Stein's unbiased risk estimate) at sigma {sigma} "
            "over the noisy training images, no clean pixel read"
        )
        if f"val_psnr{sigma}_network" in metrics:
            output += (
                f"; on the held-out validation images it moved the PSNR from {metrics[f'val_psnr{sigma}_network']:.2f} "
                f"(network alone) to {metrics[f'val_psnr{sigma}_blended']:.2f} dB"
            )
    start = ""
    if recipe.initial is not None:
        earlier = manifest.training["init_from"]
        scores = ", ".join(f"{key.replace('_s', ' sigma ')} {value:.2f}" for key, value in earlier["psnr"].items())
        start = (
            f"- started from the weights of `{args.init_from}` (graph sha256 `{recipe.initial.sha256[:12]}`; its test PSNR "
            f"as exported then: {scores or 'not recorded'} dB), trained by `{earlier['command']}` ({earlier['seconds']} s, "
            f"commit `{earlier['commit']}`); "
            + ("no epoch was trained here.\n" if args.epochs == 0 else "the epochs below continue from there.\n")
        )
    steps = (
        f"- {args.epochs} epochs x {args.patches_per_image} random {args.patch}x{args.patch} patches per image (flips and\n"
        f"  90-degree turns), batch {args.batch_size}, Adam (lr {args.lr}, 3 % warm-up then cosine); bf16 autocast:\n"
        f"  {recipe.autocast}.\n"
        if args.epochs
        else ""
    )
    bm3d_note = {
        "run": "computed by this code, in this run, on exactly the same noisy images (cached in `runs/bm3d-cache`)",
        "cached": "computed by this code on exactly the same noisy images (from `runs/bm3d-cache`; images without a "
        "cached result are left out of the BM3D column and the gap is on the common images)",
        "none": "not run",
    }[args.bm3d]
    return f"""# {manifest.name}

Gaussian denoiser ({args.mode}). Input: {inputs}. Output: the clean image ({output}).

## Result
Test sets, measured once after training by ONNX Runtime through the service's own tiling code
(`python -m training.denoise_eval`): additive white Gaussian noise, unclipped float noisy
input, noise seed {denoise_eval.NOISE_SEED} (the same noisy images for this model and for BM3D); outputs rounded to
8 bits; PSNR (peak 255) and SSIM (Gaussian window 11, sigma 1.5; mean over channels for colour).
BM3D: the `bm3d` package {denoise_eval.bm3d_version()} (profile `np`; CBM3D for CBSD68) with the true sigma,
{bm3d_note}. Published columns: DnCNN-S and BM3D as in Zhang et al. 2017.

{denoise_eval.table(rows) if rows else "No test set was measured (`--test-sets` named none)."}

{metrics_table({k: v for k, v in manifest.metrics.items() if not k.startswith(("psnr_", "ssim_", "bm3d_"))})}

## Model
{net}; {params / 1e6:.2f} M parameters, {onnx_path.stat().st_size / 1e6:.1f} MB ONNX, dynamic batch, height and
width (multiples of {recipe.stride}; the service reflect-pads). Served in tiles of `defaults.tile` =
{manifest.defaults["tile"]} px with `defaults.overlap` = {manifest.defaults["overlap"]} px kept on each inner side (cropped-centre
stitching: the margin is at least the receptive-field radius, {radius} px as measured at export, so tiles leave no seams).

## Training
{start}- {how}.
- data: `{t["data"]}`, {t["train_images"]} training images; {held_out(args)}; the test sets were never used for
  training, tuning or model selection (the last epoch is exported).
{steps}{provenance(t)}

![curves](curves.png)
"""


def held_out(args: argparse.Namespace) -> str:
    """The card's words for the validation images."""
    if not args.val_count:
        return "no image held out (no clean one to validate on): no validation PSNR"
    source = f" of `{args.data_dir}`" if args.mode == "n2v" and args.noisy_dir else ""
    return (
        f"the last {args.val_count} clean images{source} (folders in order, by name) held out for the per-epoch "
        "validation PSNR (fixed noise)"
    )


def main(args: argparse.Namespace) -> None:
    if args.mode == "n2v" and args.noisy_dir and args.blend == "sure" and args.noise_sigma is None:
        raise SystemExit("--noisy-dir with --blend sure needs --noise-sigma (your photos' noise level), or --blend none")
    args.noise_sigma = 25.0 if args.noise_sigma is None else args.noise_sigma
    if args.val_count is None:  # a user's noisy photos alone: no clean image to validate on (Train400 was read)
        args.val_count = 0 if args.mode == "n2v" and args.noisy_dir else 20
    if not 1 <= args.tile <= MAX_TILE:  # the manifest refuses it: say so now, not at the export after the training
        raise SystemExit(f"--tile {args.tile}: the service takes tiles of 1..{MAX_TILE} px")
    if args.tile < 3 * args.overlap:  # the service would keep a third of the tile as overlap, less than asked
        raise SystemExit(f"--tile {args.tile} is under 3x --overlap {args.overlap}; the service would cut the overlap")
    missing = [name for name in args.test_sets if not (args.test_dir / name).is_dir()]
    if missing:  # found now, not after the training
        raise SystemExit(f"--test-dir {args.test_dir} has no {', '.join(missing)} folder (or pass --test-sets)")
    start_run(args.seed, args.threads)
    if args.mode == "n2v" and args.noisy_dir and not args.val_count:
        train_paths: list[Path] = []  # noisy photos only: there is no clean image anywhere
        val_paths: list[Path] = []
    else:
        train_paths, val_paths = split_clean(args.data_dir, args.val_count, args.limit)
    val_clean = [(path.stem, read_image(path, args.color, args.reduce)) for path in val_paths]
    if args.mode == "n2v":
        if args.noisy_dir:
            noisy = image_paths(args.noisy_dir, args.limit)
        else:
            noisy = write_noisy_copy(train_paths, args.noise_sigma, args.seed, args.runs_dir / args.name, args.color, args.reduce)
        # From here on N2V sees only the noisy copies.
        images = [read_image(path, args.color) for path in noisy]
        where = args.noisy_dir or (noisy[0].parent if noisy else "-")
        print(f"Noise2Void on {len(images)} noisy images from {where}; {len(val_clean)} held-out validation images")
    else:
        images = [read_image(path, args.color, args.reduce) for path in train_paths]
        print(f"{len(images)} clean training images, {len(val_clean)} held out for validation")
    recipe = DenoiserRecipe(args, images, val_clean)
    result = fit(recipe, args.epochs, args.runs_dir / args.name, args.resume, stop_after=args.stop_after, options=vars(args))
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    try:
        metrics = export(recipe, args, result, len(images))
    except ParityError as error:
        raise SystemExit(f"export refused: {error}") from None
    print(f"exported {args.models_dir / args.name}: {metrics}")
