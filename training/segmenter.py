"""Semantic segmenter recipe: a U-Net trained from scratch with cross-entropy + Dice.

    python -m training segmenter --data-dir ../shared/datasets/pennfudan --name pennfudan-unet

``--data-dir`` is Penn-Fudan (person vs background; first 120 photos train, last 50 test),
ISBI 2012 (membranes; 5 of the 30 labelled slices held out) or a user's ``images/`` + ``masks/``
folder (see ``training/datasets/masks.py``). Training sees random crops of photos whose longer
side is scaled to ``--max-side`` times a random factor (scale jitter), with flips and colour
jitter applied jointly to image and mask by ``torchvision.transforms.v2``; bf16 autocast and
channels-last on the CPU. Evaluation runs the way the service does: the whole photo, longer
side scaled down to ``--max-side``, reflect-padded to the network stride, logits resized back to
the original size, argmax, compared with the full-resolution ground truth.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from service.images import Span, decode_for_graph
from service.manifest import InputSpec, Manifest, Task
from service.settings import DEFAULT_MODELS
from service.tasks import segmentation
from training.datasets import MAX_PIXELS, ChannelStatistics, is_photo
from training.datasets.copies import copied_indices, copies_note, copies_warning
from training.datasets.masks import IGNORE, MaskSplit, image_mask_folder, isbi2012, pennfudan
from training.engine import FitResult, bf16_autocast, fit, start_run, warmup_cosine
from training.export import OrtParity, ParityError, export_onnx, fit_record, metrics_table, provenance, write_model_folder
from training.nets.unet import FlipAveragedMaps, UNet

LOGIT_TOLERANCE = 2e-3
PIXEL_TOLERANCE = 0.001  # fraction of test pixels whose label may differ between runtimes (outside near-ties)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/pennfudan"))
    parser.add_argument(
        "--dataset", choices=["auto", "pennfudan", "isbi2012", "folder"], default="auto", help="auto: from the folder's layout"
    )
    parser.add_argument("--name", default="pennfudan-unet")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="the model repository the service reads")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and logs")
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--dice-weight", type=float, default=1.0, help="loss = cross-entropy + w * (1 - mean Dice)")
    parser.add_argument("--base", type=int, default=24, help="U-Net width at full resolution")
    parser.add_argument("--depth", type=int, default=5, help="poolings; the stride is 2**depth")
    parser.add_argument("--max-width", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1, help="channel dropout at the bottleneck")
    parser.add_argument("--max-side", type=int, default=320, help="train and serve with the longer side at this size")
    parser.add_argument("--crop", type=int, default=256, help="square training crop")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.4), help="scale jitter range around --max-side")
    parser.add_argument("--repeats", type=int, default=1, help="crops per training image per epoch")
    parser.add_argument("--eval-every", type=int, default=20, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--val-count", type=int, default=0, help="hold out the last N training images for per-epoch eval")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="user folders without test/: held-out share")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke runs)")
    parser.add_argument("--no-flip-tta", action="store_true", help="export without mirror-averaged logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0, help="draws the held-out split of a folder without test/")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="end after epoch N of the schedule (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (the default where the CPU has no bf16 kernels)")


def load_splits(args: argparse.Namespace) -> tuple[MaskSplit, MaskSplit, str, str]:
    """Train and evaluation splits, the evaluation split's description and the colour mode."""
    kind = args.dataset
    if kind == "auto":
        if (args.data_dir / "masks").is_dir() and (args.data_dir / "annotations").is_dir():
            kind = "pennfudan"
        elif (args.data_dir / "train" / "label").is_dir():
            kind = "isbi2012"
        else:
            kind = "folder"
    if kind == "pennfudan":
        train, test = pennfudan(args.data_dir, args.limit)
        split, color = "test (last 50 photos by name)", "RGB"
    elif kind == "isbi2012":
        train, test = isbi2012(args.data_dir, args.limit)
        split, color = "held-out slices 25-29", "GRAY"
    else:
        photos = [p for p in sorted(args.data_dir.rglob("*")) if p.parent.name == "images" and is_photo(p, args.data_dir)]
        if not photos:
            raise ValueError(f"{args.data_dir}: no photos under an images/ folder (the layout: images/ + masks/)")
        color = "GRAY" if all(_is_gray(p) for p in photos) else "RGB"  # one colour photo makes an RGB model
        train, test, split = image_mask_folder(args.data_dir, color, args.val_fraction, args.split_seed, args.limit)
    return train, test, split, color


def _is_gray(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        # The modes Pillow opens gray files in (16-bit big-endian and float TIFFs too: micrographs), as the service reads them.
        return image.mode in ("L", "I", "F", "1", "LA", "La") or image.mode.startswith("I;16")


class Eval:
    """Evaluation photos pre-processed once exactly as the service does (bytes -> tensor)."""

    def __init__(self, split: MaskSplit, manifest: Manifest) -> None:
        self.items: list[tuple[np.ndarray, tuple[int, int], Span, np.ndarray]] = []  # tensor, model_hw, span, mask
        max_side = manifest.defaults["max_side"]
        for path, mask in zip(split.paths, split.masks, strict=True):
            decoded = decode_for_graph(path.read_bytes(), MAX_PIXELS, manifest.input.color, (max_side, max_side), False)
            width, height = decoded.size
            model_w, model_h = segmentation.model_size(*decoded.image.size, max_side)
            tensor = segmentation.preprocess(decoded.image, manifest)
            assert mask.shape == (height, width), (path, mask.shape, (height, width))
            self.items.append((tensor, (model_h, model_w), decoded.span, mask))


class Confusion:
    """Pixel confusion matrix over a whole split: IoU/Dice are ratios of summed pixel counts."""

    def __init__(self, classes: int) -> None:
        self.matrix = np.zeros((classes, classes), np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        valid = truth != IGNORE
        n = len(self.matrix)
        self.matrix += np.bincount(truth[valid].astype(np.int64) * n + predicted[valid], minlength=n * n).reshape(n, n)

    def metrics(self, labels: list[str]) -> dict[str, float]:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        fp, fn = m.sum(0) - tp, m.sum(1) - tp
        iou = tp / np.maximum(tp + fp + fn, 1)
        dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        # Means over the classes that occur (in the truth or the predictions): a class absent from the split
        # has no IoU, and counting it as 0 would lower the headline number for nothing.
        seen = (tp + fp + fn) > 0
        result = {f"iou_{label}": float(v) for label, v in zip(labels, iou, strict=True)}
        result["miou"] = float(iou[seen].mean()) if seen.any() else 0.0
        result.update({f"dice_{label}": float(v) for label, v in zip(labels, dice, strict=True)})
        result["mean_dice"] = float(dice[seen].mean()) if seen.any() else 0.0
        result["pixel_accuracy"] = float(tp.sum() / max(m.sum(), 1))
        return result


def soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the soft Dice of the per-pixel softmax, ignoring unlabelled pixels."""
    probabilities = logits.softmax(1)
    valid = (target != IGNORE).unsqueeze(1)
    one_hot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2)
    probabilities, one_hot = probabilities * valid, one_hot * valid
    intersection = (probabilities * one_hot).sum((0, 2, 3))
    total = probabilities.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    return ((2 * intersection + 1) / (total + 1)).mean()


class TrainBatches:
    """One epoch of jointly augmented (image, mask) crops, drawn from a generator seeded by the epoch."""

    def __init__(self, recipe: SegmenterRecipe, epoch: int) -> None:
        self.recipe, self.epoch = recipe, epoch
        self.order = torch.randperm(
            len(recipe.samples) * recipe.args.repeats, generator=torch.Generator().manual_seed(recipe.args.seed * 1000 + epoch)
        ) % len(recipe.samples)
        self.batch = recipe.args.batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch)

    def __iter__(self):
        # v2 transforms draw from torch's global generator: seed it per epoch so --resume repeats the run.
        torch.manual_seed(self.recipe.args.seed * 1000 + self.epoch)
        for start in range(0, len(self.order), self.batch):
            pairs = [self.recipe.augment(*self.recipe.samples[i]) for i in self.order[start : start + self.batch].tolist()]
            yield torch.stack([image for image, _ in pairs]), torch.stack([mask for _, mask in pairs]).long()


class SegmenterRecipe:
    def __init__(self, args: argparse.Namespace, train: MaskSplit, evaluation: MaskSplit, color: str) -> None:
        self.args, self.train, self.labels = args, train, train.labels
        self.autocast = bf16_autocast(args.no_bf16)
        channels = 3 if color == "RGB" else 1
        statistics = ChannelStatistics()
        for image in train.images:
            statistics.add(image.reshape(-1, channels))
        self.mean, self.std = statistics.result()
        self.model = UNet(channels, len(self.labels), args.base, args.depth, args.max_width, args.dropout)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.manifest = self.make_manifest(color)
        self.eval_set = Eval(evaluation, self.manifest)

        # Photos are pre-scaled once so their longer side is the largest a jittered crop can need.
        largest = round(args.max_side * args.scale[1])
        self.samples: list[tuple[tv_tensors.Image, tv_tensors.Mask]] = []
        for image, mask in zip(train.images, train.masks, strict=True):
            image_t = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous())
            mask_t = tv_tensors.Mask(torch.from_numpy(mask.copy())[None])
            if max(mask.shape) > largest:
                size = segmentation.model_size(mask.shape[1], mask.shape[0], largest)
                image_t, mask_t = (
                    v2.functional.resize(image_t, [size[1], size[0]]),
                    v2.functional.resize(mask_t, [size[1], size[0]]),
                )
            self.samples.append((image_t, mask_t))
        steps = [
            v2.ScaleJitter((args.max_side, args.max_side), scale_range=tuple(args.scale)),
            v2.RandomCrop(args.crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
            v2.RandomHorizontalFlip(),
        ]
        if color == "RGB":
            steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03))
        else:  # micrographs have no "up": a vertical flip is as valid a sample as a horizontal one
            steps += [v2.RandomVerticalFlip(), v2.ColorJitter(brightness=0.2, contrast=0.2)]
        self.augment = v2.Compose(steps)

        self.steps_per_epoch = len(TrainBatches(self, 0))
        self.total_steps = self.steps_per_epoch * args.epochs
        self.step = 0
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
        )

    def make_manifest(self, color: str) -> Manifest:
        return Manifest(
            name=self.args.name,
            task=Task.segmentation,
            version="1",
            sha256="0" * 64,
            input=InputSpec(
                name="input",
                color=color,
                size=None,
                resize="none",
                mean=[round(v, 6) for v in self.mean],
                std=[round(v, 6) for v in self.std],
            ),
            outputs={"logits": "logits"},
            labels=self.labels,
            defaults={"max_side": self.args.max_side, "stride": self.model.stride, "pad": "reflect"},
        )

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, int(0.05 * self.total_steps), self.total_steps)

    def train_batches(self, epoch: int) -> TrainBatches:
        return TrainBatches(self, epoch)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        images, masks = batch
        masks = masks[:, 0]
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.lr_factor(self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(self.normalise(images)).float()
        ce = F.cross_entropy(logits, masks, ignore_index=IGNORE)
        dice = soft_dice(logits, masks)
        loss = ce + self.args.dice_weight * (1 - dice)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "ce": ce.item(), "dice": dice.item()}

    def end_epoch(self, epoch: int) -> None:
        pass

    def served(self) -> nn.Module:
        return self.model if self.args.no_flip_tta else FlipAveragedMaps(self.model)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        # float32, as served: every photo has its own size, and bf16 kernels are re-planned per shape (slower).
        served = self.served().eval()
        confusion = Confusion(len(self.labels))
        for tensor, model_hw, span, truth in self.eval_set.items:
            logits = served(torch.from_numpy(tensor).contiguous(memory_format=torch.channels_last)).numpy()[0]
            confusion.add(truth, segmentation.labels_from_logits(logits, model_hw, span))
        return confusion.metrics(self.labels)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


def export(
    recipe: SegmenterRecipe,
    args: argparse.Namespace,
    fitted: FitResult,
    split: str,
    test: MaskSplit | None,
    copies: list[Path] | None = None,
) -> dict[str, Any]:
    """Export with dynamic H and W, check parity on every test photo, write the model folder. ``copies``: test
    photos that copy training photos (``training.datasets.copies``; counted and named in the card)."""
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    served = recipe.served().eval().float().to(memory_format=torch.contiguous_format)
    stride = recipe.model.stride
    channels = recipe.manifest.input.channels
    export_onnx(
        served, torch.zeros(1, channels, 2 * stride, 3 * stride), onnx_path, output_names=["logits"], dynamic_spatial=True
    )

    # Every test photo at its own serving size: also proves the graph takes sizes other than the example's.
    parity = OrtParity(served, onnx_path, LOGIT_TOLERANCE)
    onnx_confusion, torch_confusion = Confusion(len(recipe.labels)), Confusion(len(recipe.labels))
    disagreements = pixels = 0
    test_eval = Eval(test, recipe.manifest) if test is not None else recipe.eval_set
    for tensor, model_hw, span, truth in test_eval.items:
        (torch_logits,), (onnx_logits,) = parity.run(torch.from_numpy(tensor))
        torch_labels = segmentation.labels_from_logits(torch_logits[0], model_hw, span)
        onnx_labels = segmentation.labels_from_logits(onnx_logits[0], model_hw, span)
        torch_confusion.add(truth, torch_labels)
        onnx_confusion.add(truth, onnx_labels)
        # Compared at the graph's resolution; pixels whose top-2 margin is within the tolerance may flip either way.
        height, width = model_hw
        torch_crop, onnx_crop = torch_logits[0][:, :height, :width], onnx_logits[0][:, :height, :width]
        top2 = np.sort(torch_crop, axis=0)[-2:]
        changed = (torch_crop.argmax(0) != onnx_crop.argmax(0)) & ((top2[1] - top2[0]) > 2 * LOGIT_TOLERANCE)
        disagreements += int(changed.sum())
        pixels += changed.size
    first = torch.from_numpy(test_eval.items[0][0])
    parity.run(torch.cat([first, first.flip(-1)]))  # the batch axis is dynamic too (two photos of one size)
    parity.check()
    if disagreements / pixels > PIXEL_TOLERANCE:
        raise ParityError(f"labels differ on {disagreements} of {pixels} test pixels")

    onnx_metrics = onnx_confusion.metrics(recipe.labels)
    metrics: dict[str, Any] = {
        "dataset": args.data_dir.name,
        "split": split,
        "images": len(test_eval.items),
        "protocol": f"whole photos, longer side scaled to {args.max_side}, logits resized to the original size",
        **onnx_metrics,
        "miou_torch": torch_confusion.metrics(recipe.labels)["miou"],
        "parity_max_abs_logit_diff": parity.max_abs_diff,
        "parity_pixel_disagreements": disagreements,
    }
    if copies:
        metrics["test_copies_of_training"] = sorted(path.name for path in copies)
    manifest = recipe.manifest.model_copy(deep=True)
    manifest.metrics = metrics
    manifest.training = fit_record(
        args,
        fitted,
        train_images=len(recipe.train),
    )
    write_model_folder(
        args.models_dir / args.name, onnx_path, manifest, model_card(args, manifest, recipe, onnx_path), run_dir / "curves.png"
    )
    return metrics


def copies_sentence(metrics: dict[str, Any]) -> str:
    copies = metrics.get("test_copies_of_training")
    return f"\n\n{copies_note(copies)}" if copies else ""


def val_curves(args: argparse.Namespace) -> str:
    if args.val_count:
        return f' The "val" curves below are the last {args.val_count} training images, held out.'
    return ' The "val" curves below are the test split, watched only (`--val-count N` holds out training images).'


def model_card(args: argparse.Namespace, manifest: Manifest, recipe: SegmenterRecipe, onnx_path: Path) -> str:
    params = sum(p.numel() for p in recipe.model.parameters())
    m, t = manifest.metrics, manifest.training
    fg = manifest.labels[-1]
    tta = "" if args.no_flip_tta else " The graph averages the logits of the image and of its mirror."
    return f"""# {manifest.name}

Semantic segmenter ({len(manifest.labels)} classes: {", ".join(manifest.labels)}).

## Result
On {m["images"]} images of the {m["split"]} split of `{m["dataset"]}`, measured by ONNX Runtime on the
exported graph the way the service runs it ({m["protocol"]}; IoU and Dice are ratios of pixel counts summed
over the split): **{fg} IoU {m[f"iou_{fg}"]:.3f}**, mIoU {m["miou"]:.3f}, {fg} Dice {m[f"dice_{fg}"]:.3f},
pixel accuracy {m["pixel_accuracy"]:.3f} (PyTorch mIoU: {m["miou_torch"]:.3f}).{copies_sentence(m)}

{metrics_table(m)}

## Model
U-Net (`training/nets/unet.py`): {args.depth} poolings (stride {recipe.model.stride}), widths from {args.base}
doubling up to {args.max_width}, 2x2 up-convolutions, skip connections, batch-norm, bottleneck dropout
{args.dropout}; {params / 1e6:.2f} M parameters, {onnx_path.stat().st_size / 1e6:.1f} MB ONNX.
Fully convolutional: the graph takes any height and width (the service pads to a multiple of
{recipe.model.stride} with reflection and crops the logits back).{tta}
Input {manifest.input.color}, normalised by the training set's mean/std; serving scales the longer side
down to `defaults.max_side` = {args.max_side} (the training scale) and resizes the logits back to the photo's size.

## Training
- data: `{t["data"]}`, {t["train_images"]} training images; the last epoch is exported, not one picked by a
  score.{val_curves(args)}
- {args.epochs} epochs x {args.repeats} random {args.crop}x{args.crop} crop(s) per image, batch {args.batch_size},
  AdamW (lr {args.lr}, weight decay {args.weight_decay}), 5 % warm-up then cosine, loss cross-entropy +
  {args.dice_weight} x (1 - soft Dice); `transforms.v2` on image + `tv_tensors.Mask` jointly: scale jitter
  {args.scale[0]}-{args.scale[1]} around a {args.max_side}-pixel longer side, random crop, flips, colour jitter;
  bf16 autocast: {recipe.autocast}.
{provenance(t)}

![curves](curves.png)
"""


def main(args: argparse.Namespace) -> None:
    if args.crop % 2**args.depth:  # the U-Net joins each up-sampled map to its skip: else the first step fails
        raise SystemExit(f"--crop {args.crop}: a multiple of {2**args.depth}, the stride of {args.depth} poolings")
    start_run(args.seed, args.threads)
    train, test, split, color = load_splits(args)
    copies = [test.paths[i] for i in copied_indices(test.images, train.images)]
    if copies:
        print(copies_warning([path.name for path in copies], len(test), split))
    evaluation = test
    if args.val_count:
        keep = list(range(len(train) - args.val_count))
        evaluation = train.subset(list(range(len(train) - args.val_count, len(train))))
        train = train.subset(keep)
    print(f"{len(train)} training / {len(test)} {split} images ({color}), classes: {train.labels}")
    recipe = SegmenterRecipe(args, train, evaluation, color)
    result = fit(
        recipe,
        args.epochs,
        args.runs_dir / args.name,
        args.resume,
        eval_every=args.eval_every,
        stop_after=args.stop_after,
        options=vars(args),
    )
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    metrics = export(recipe, args, result, split, test if args.val_count else None, copies)
    fg = train.labels[-1]
    print(
        f"exported {args.models_dir / args.name}: {fg} IoU {metrics[f'iou_{fg}']:.4f}, mIoU {metrics['miou']:.4f} (onnx), "
        f"max |logit diff| {metrics['parity_max_abs_logit_diff']:.2e}, {result.seconds:.0f} s training"
    )
