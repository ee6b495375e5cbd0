"""Image classifier recipe: a residual CNN trained with cross-entropy on any ImageFolder dataset.

    python -m training classifier --data-dir ../shared/datasets/cifar10 --name cifar10-resnet

``--data-dir`` holds ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``, ``valid/``, ``validation/``;
without any, ``--val-fraction`` of each class is held out, drawn with ``--split-seed``). The schedule is the
fast-CIFAR one (airbench): nesterov SGD on a summed label-smoothed loss, a triangular learning rate, lookahead weight
averaging, alternating flips, 4-pixel reflected translations and 12-pixel Cutout, bf16 autocast and
channels-last on the CPU. The exported graph averages the logits of the image and its mirror.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.manifest import InputSpec, Manifest, Task
from service.settings import DEFAULT_MODELS
from training.datasets import ChannelStatistics
from training.datasets.copies import copies_note, copies_warning
from training.datasets.imagefolder import TensorImages, load_image_folder
from training.engine import FitResult, bf16_autocast, fit, start_run
from training.export import OrtParity, ParityError, export_onnx, fit_record, metrics_table, provenance, write_model_folder
from training.nets.resnet import FlipAveragedLogits, ResidualCNN

LOGIT_TOLERANCE = 1e-3
TOP1_TOLERANCE = 0.001  # fraction of test images whose prediction may differ between runtimes
MIN_SIDE = 9
WHITENING_PATCHES = 5_000_000  # 2x2 patches for the stem's covariance (in float64, 12 values each: 480 MB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/cifar10"))
    parser.add_argument("--name", default="cifar10-resnet")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="the model repository the service reads")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and logs")
    parser.add_argument("--epochs", type=int, default=58, help="58 took 3,222 s on CIFAR-10 on 2 AVX-512 cores")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=11.5, help="airbench-style lr per 1024 summed examples")
    parser.add_argument("--momentum", type=float, default=0.85)
    parser.add_argument("--weight-decay", type=float, default=0.0153)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--translate", type=int, default=4, help="random shifts of up to N pixels (reflect-padded)")
    parser.add_argument("--cutout", type=int, default=12, help="a random NxN square of each training image set to the mean")
    parser.add_argument("--widths", type=int, nargs=3, default=(64, 256, 256))
    parser.add_argument("--image-size", type=int, default=None, help="resize user images to this square size")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held out of each class when there is no test/ folder")
    parser.add_argument("--split-seed", type=int, default=0, help="draws that held-out split (apart from --seed)")
    parser.add_argument("--limit-per-class", type=int, default=None, help="first N images per class (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="end after epoch N of the schedule (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (the default where the CPU has no bf16 kernels)")


class Lookahead:
    """Slow weights pulled towards the fast ones every few steps, then copied back (airbench)."""

    def __init__(self, model: nn.Module) -> None:
        self.slow = {name: value.detach().clone() for name, value in model.state_dict().items() if value.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 ``[N, C, H, W]`` images, in [0, 1], a chunk at a time
    (a float copy of the whole set would take 4x its memory: 12 GB for 20,000 images of 224 px)."""
    statistics = ChannelStatistics()
    for i in range(0, len(images), chunk):
        statistics.add(images[i : i + chunk].permute(0, 2, 3, 1).numpy())
    mean, std = statistics.result()
    return torch.tensor(mean), torch.tensor(std)


def evaluation_batch(size: int, at_32_pixels: int) -> int:
    """Images per evaluation batch: ``at_32_pixels`` for CIFAR's size, as many pixels for larger images."""
    return max(1, at_32_pixels * 32 * 32 // (size * size))


class TranslatedBatches:
    """One epoch of shuffled batches, each image shifted by up to ``--translate`` pixels (from the reflect-padded
    copy), mirrored on alternate epochs, and with ``--cutout`` a square of it set to the mean (airbench96). Built a
    batch at a time: a shifted copy of the whole set would double memory."""

    def __init__(self, recipe: ClassifierRecipe, epoch: int) -> None:
        generator = torch.Generator().manual_seed(recipe.args.seed * 1000 + epoch)
        n = len(recipe.train)
        self.recipe = recipe
        self.shift = (recipe.padded.shape[-1] - recipe.train.images.shape[-1]) // 2
        self.dy = torch.randint(0, 2 * self.shift + 1, (n,), generator=generator)
        self.dx = torch.randint(0, 2 * self.shift + 1, (n,), generator=generator)
        self.flip = recipe.flip_base ^ bool(epoch % 2)
        self.order = torch.randperm(n, generator=generator)
        self.size = recipe.args.batch_size
        # Cutout centres anywhere in the image (a square may hang over its edge, as in Cutout's paper).
        self.cutout = recipe.args.cutout
        side = recipe.train.images.shape[-1]
        self.centres = torch.randint(0, side, (n, 2), generator=generator) if self.cutout else None

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        padded = self.recipe.padded
        offsets = torch.arange(padded.shape[-1] - 2 * self.shift)
        channels = torch.arange(padded.shape[1])[None, :, None, None]
        for i in range(0, len(self.order), self.size):
            chosen = self.order[i : i + self.size]
            rows = (self.dy[chosen, None] + offsets)[:, None, :, None]
            cols = (self.dx[chosen, None] + offsets)[:, None, None, :]
            images = padded[chosen[:, None, None, None], channels, rows, cols]
            flip = self.flip[chosen]
            images[flip] = images[flip].flip(-1)
            if self.centres is not None:
                images = self.cut_out(images, self.centres[chosen], offsets)
            yield images, self.recipe.train.labels[chosen]

    def cut_out(self, images: torch.Tensor, centres: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``images`` with a ``cutout``-sided square around each centre set to the training set's mean (zero once
        normalised)."""
        start = centres - self.cutout // 2
        inside_rows = (offsets >= start[:, :1]) & (offsets < start[:, :1] + self.cutout)
        inside_cols = (offsets >= start[:, 1:]) & (offsets < start[:, 1:] + self.cutout)
        square = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
        return torch.where(square, self.recipe.mean_pixel[None, :, None, None], images)


class ClassifierRecipe:
    def __init__(self, args: argparse.Namespace, train: TensorImages, test: TensorImages) -> None:
        self.args, self.train, self.test = args, train, test
        self.autocast = bf16_autocast(args.no_bf16)
        self.mean, self.std = channel_statistics(train.images)
        self.model = ResidualCNN(len(train.classes), tuple(args.widths)).to(memory_format=torch.channels_last)
        # From a seeded sample of every class: the first 5000 of a class-sorted folder are one class (CIFAR's airplanes).
        size = train.images.shape[-1]
        count = max(1, min(5000, WHITENING_PATCHES // (size - 1) ** 2))  # 5000 CIFAR images; fewer large ones
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:count]
        self.model.init_whitening(self.normalise(train.images[sample]))
        self.steps_per_epoch = math.ceil(len(train) / args.batch_size)
        self.total_steps = self.steps_per_epoch * args.epochs
        self.step = 0

        # Summed loss with lr / wd scaled as in airbench; BN and stem biases learn 64x faster. The decay is
        # decoupled from the learning rate: SGD multiplies weight_decay by lr, so it is given as wd / lr.
        kilostep = 1024 * (1 + 1 / (1 - args.momentum))
        lr, wd, bias_scale = args.lr / kilostep, args.weight_decay * args.batch_size / kilostep, 64.0
        biases = [p for n, p in self.model.named_parameters() if (p.requires_grad and "norm" in n) or n == "whiten.bias"]
        others = [p for p in self.model.parameters() if p.requires_grad and all(p is not b for b in biases)]
        self.optimizer = torch.optim.SGD(
            [
                {"params": others, "lr": lr, "weight_decay": wd / lr, "base_lr": lr},
                {"params": biases, "lr": lr * bias_scale, "weight_decay": wd / (lr * bias_scale), "base_lr": lr * bias_scale},
            ],
            momentum=args.momentum,
            nesterov=True,
        )
        self.lookahead = Lookahead(self.model)
        # Alternating flips: a seeded half of the images is mirrored on even epochs, the other half on odd ones.
        generator = torch.Generator().manual_seed(args.seed)
        self.flip_base = torch.rand(len(train), generator=generator) < 0.5
        shift = args.translate
        self.padded = F.pad(train.images, (shift, shift, shift, shift), mode="reflect") if shift else train.images
        self.mean_pixel = (self.mean * 255).round().to(torch.uint8)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        return ((x - self.mean[:, None, None]) / self.std[:, None, None]).contiguous(memory_format=torch.channels_last)

    def lr_factor(self, step: int) -> float:
        # Triangular: 0.2 -> 1 over the first 23% of steps, then down to 0.07.
        progress = min(1.0, step / self.total_steps)  # past the end (fewer steps than planned): stay at the floor
        if progress < 0.23:
            return 0.2 + 0.8 * progress / 0.23
        return 1.0 + (0.07 - 1.0) * (progress - 0.23) / 0.77

    def train_batches(self, epoch: int) -> TranslatedBatches:
        return TranslatedBatches(self, epoch)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        images, labels = batch
        self.model.train()
        if self.step == self.steps_per_epoch * 3:  # the whitening bias trains for the first 3 epochs only
            self.model.whiten.bias.requires_grad_(False)  # type: ignore[union-attr]  # built with a bias
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.lr_factor(self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(self.normalise(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing, reduction="none")
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        self.optimizer.step()
        self.step += 1
        if self.step % 5 == 0:
            self.lookahead.update(self.model, decay=0.95**5 * min(1.0, self.step / self.total_steps) ** 3)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        return {"loss": loss.mean().item(), "acc": accuracy}

    def end_epoch(self, epoch: int) -> None:
        if epoch + 1 == self.args.epochs:
            self.lookahead.update(self.model, decay=1.0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Flip-averaged logits, as the exported graph computes them."""
        self.model.eval()
        flipped = FlipAveragedLogits(self.model)
        outputs = []
        batch = evaluation_batch(images.shape[-1], 1000)
        for i in range(0, len(images), batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                outputs.append(flipped(self.normalise(images[i : i + batch])).float())
        return torch.cat(outputs)

    def evaluate(self) -> dict[str, float]:
        logits = self.predict(self.test.images)
        # With the training loss's label smoothing, so that the two curves of one panel measure the same thing.
        loss = F.cross_entropy(logits, self.test.labels, label_smoothing=self.args.label_smoothing).item()
        return {"loss": loss, "acc": (logits.argmax(1) == self.test.labels).float().mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lookahead": self.lookahead.slow,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lookahead.slow = state["lookahead"]
        self.step = state["step"]
        if self.step >= self.steps_per_epoch * 3:
            self.model.whiten.bias.requires_grad_(False)  # type: ignore[union-attr]  # built with a bias


def stratified_split(labels: torch.Tensor, classes: list[str], fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices kept for training and held out: ``fraction`` of every class (never its last image), drawn with a
    seed of its own, so that runs with other ``--seed`` values are measured on the same images."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in labels.unique(sorted=True):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(round(len(members) * fraction), len(members) - 1)
        held.append(members[:count])
        kept.append(members[count:])
        if len(members) < 5:
            print(f"warning: class {classes[int(label)]!r} has {len(members)} image(s); {count} held out")
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


HELD_OUT_FOLDERS = ("test", "val", "valid", "validation")  # the first present is the held-out split


def load_splits(args: argparse.Namespace) -> tuple[TensorImages, TensorImages, str]:
    has_train = (args.data_dir / "train").is_dir()
    held_out = [name for name in HELD_OUT_FOLDERS if (args.data_dir / name).is_dir()]
    if held_out and not has_train:  # else test/ would be read as a class folder and its photos trained on
        raise ValueError(f"{args.data_dir} has a {held_out[0]}/ folder but no train/ beside it")
    train_dir = args.data_dir / "train" if has_train else args.data_dir
    train = load_image_folder(train_dir, args.image_size, limit_per_class=args.limit_per_class)
    height, width = train.images.shape[-2:]
    if height != width:  # the network, its export and the manifest take square images
        raise ValueError(f"images under {train_dir} are {width}x{height}, not square; pass --image-size")
    if held_out:  # (a train/ + val/ layout was ignored: 10 % of train/ was held out instead)
        if len(held_out) > 1:
            print(f"held out: {held_out[0]}/ ({', '.join(name + '/' for name in held_out[1:])} not read)")
        test = load_image_folder(args.data_dir / held_out[0], args.image_size, train.classes, args.limit_per_class)
        return train, test, held_out[0]
    kept, held = stratified_split(train.labels, train.classes, args.val_fraction, args.split_seed)
    return train.subset(kept), train.subset(held), f"{args.val_fraction:.0%} of each class (--split-seed {args.split_seed})"


def export(
    recipe: ClassifierRecipe, args: argparse.Namespace, fitted: FitResult, split: str, copies: list[str]
) -> dict[str, Any]:
    """Export, check parity on the whole test split with ONNX Runtime, write the model folder. ``copies``: test
    images that copy a training image (counted in top-1, though seen in training)."""
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    served = FlipAveragedLogits(recipe.model).eval().float().to(memory_format=torch.contiguous_format)
    size = recipe.train.images.shape[-1]
    export_onnx(served, torch.zeros(2, 3, size, size), onnx_path, output_names=["logits"])

    parity = OrtParity(served, onnx_path, LOGIT_TOLERANCE)
    correct_onnx = correct_torch = disagreements = 0
    batch = evaluation_batch(size, 500)
    for i in range(0, len(recipe.test), batch):
        images, labels = recipe.test.images[i : i + batch], recipe.test.labels[i : i + batch]
        (torch_logits,), (onnx_logits,) = parity.run(recipe.normalise(images).contiguous())
        torch_top1, onnx_top1 = torch_logits.argmax(1), onnx_logits.argmax(1)
        correct_torch += int((torch_top1 == labels.numpy()).sum())
        correct_onnx += int((onnx_top1 == labels.numpy()).sum())
        # A near-tie (top-2 margin within the logit tolerance) may flip either way; it is no disagreement.
        top2 = np.sort(torch_logits, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * LOGIT_TOLERANCE
        disagreements += int(((torch_top1 != onnx_top1) & decided).sum())
    parity.check()
    if disagreements / len(recipe.test) > TOP1_TOLERANCE:
        raise ParityError(f"top-1 differs on {disagreements} of {len(recipe.test)} test images")

    metrics = {
        "dataset": str(args.data_dir.name),
        "split": split,
        "images": len(recipe.test),
        "copies_of_training_images": len(copies),
        "test_copies_of_training": copies,  # a list: in the manifest and the card's sentence, not its table
        "top1": correct_onnx / len(recipe.test),
        "top1_torch": correct_torch / len(recipe.test),
        "parity_max_abs_logit_diff": parity.max_abs_diff,
        "parity_top1_disagreements": disagreements,
    }
    manifest = Manifest(
        name=args.name,
        task=Task.classification,
        version="1",
        sha256="0" * 64,
        input=InputSpec(
            name="input",
            color="RGB",
            size=(size, size),
            resize="stretch",
            mean=[round(v, 6) for v in recipe.mean.tolist()],
            std=[round(v, 6) for v in recipe.std.tolist()],
        ),
        outputs={"logits": "logits"},
        labels=recipe.train.classes,
        defaults={"top_k": 5},
        metrics=metrics,
        training=fit_record(
            args,
            fitted,
            train_images=len(recipe.train),
        ),
    )
    card = model_card(args, manifest, recipe)
    write_model_folder(args.models_dir / args.name, onnx_path, manifest, card, run_dir / "curves.png")
    return metrics


def copies_sentence(metrics: dict[str, Any]) -> str:
    copies = metrics.get("test_copies_of_training", [])
    return f"\n{copies_note(copies)}" if copies else ""


def model_card(args: argparse.Namespace, manifest: Manifest, recipe: ClassifierRecipe) -> str:
    params = sum(p.numel() for p in recipe.model.parameters())
    m, t = manifest.metrics, manifest.training
    cutout = f", {args.cutout} px cutout" if args.cutout else ""
    return f"""# {manifest.name}

Image classifier ({len(manifest.labels)} classes: {", ".join(manifest.labels)}).

## Result
Top-1 accuracy **{m["top1"]:.2%}** on {m["images"]} images of the {m["split"]} split of `{m["dataset"]}`,
measured by ONNX Runtime on the exported graph (PyTorch: {m["top1_torch"]:.2%}).{copies_sentence(m)}

{metrics_table(m)}

## Model
Residual CNN (`training/nets/resnet.py`), widths {list(args.widths)}, {params / 1e6:.2f} M parameters,
input {"x".join(map(str, manifest.input.size or ()))} RGB normalised by the training set's mean/std.
The graph averages the logits of the image and its horizontal mirror (test-time flip).

## Training
- data: `{t["data"]}`, {t["train_images"]} training images; the test split was never used for tuning
  or model selection (the last epoch is exported). The "val" curves below are that split, watched only.
- {args.epochs} epochs, batch {args.batch_size}, nesterov SGD (lr {args.lr}, momentum {args.momentum},
  weight decay {args.weight_decay}), label smoothing {args.label_smoothing}, triangular schedule,
  lookahead, alternating flip + {args.translate} px translation{cutout}, bf16 autocast: {recipe.autocast}.
{provenance(t)}

![curves](curves.png)
"""


def main(args: argparse.Namespace) -> None:
    start_run(args.seed, args.threads)
    train, test, split = load_splits(args)
    print(f"{len(train)} training / {len(test)} {split} images, classes: {train.classes}")
    if len(train.classes) < 2:
        raise SystemExit(f"{args.data_dir} has {len(train.classes)} class folder(s); a classifier needs at least two")
    if not len(test) or not len(train):
        more = "" if split in HELD_OUT_FOLDERS else ": raise --val-fraction, or add a test/ folder"
        counts = f"{len(train)} training and {len(test)} held-out ({split}) images"
        raise SystemExit(f"{args.data_dir}: {counts}; both need some{more}")
    if (side := min(train.images.shape[2:])) < MIN_SIDE:  # the stem's 2x2 convolution and three 2x poolings
        raise SystemExit(f"the images are {side} px on a side; the network takes {MIN_SIDE} or more: pass --image-size")
    if copies := test.copies_of(train):  # a photo saved into both splits: its "held-out" score is a memory test
        print(copies_warning(copies, len(test), split))
    recipe = ClassifierRecipe(args, train, test)
    result = fit(
        recipe, args.epochs, args.runs_dir / args.name, resume=args.resume, stop_after=args.stop_after, options=vars(args)
    )
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    metrics = export(recipe, args, result, split, copies)
    print(
        f"exported {args.models_dir / args.name}: top-1 {metrics['top1']:.4f} (onnx), "
        f"max |logit diff| {metrics['parity_max_abs_logit_diff']:.2e}, {result.seconds:.0f} s training"
    )
