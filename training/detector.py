"""One-stage detector recipe: a small anchor-free YOLO-style CNN trained from scratch on boxes.

    python -m training detector --data-dir ../shared/datasets/facemask --name facemask-detector

``--data-dir`` is a Pascal VOC XML folder (``annotations/*.xml`` + ``images/``, or VOC's
``Annotations/`` + ``JPEGImages/``) or Penn-Fudan (``annotations/*.txt``). The split is by image:
``training/splits/<dataset>.json`` when it exists (facemask: a fixed, seeded 80/20 split committed
with the code), else a seeded ``--test-fraction``. A seeded ``--val-fraction`` of the training
images is held out for monitoring and for choosing the serving score threshold; the test split
is only used for the final report.

Images are decoded once and letterboxed to ``--image-size`` exactly as the service does
(``service/tasks/detection.py``), then cached as uint8. Each step draws ``--crop`` x ``--crop``
crops after flip, scale jitter and colour jitter (``torchvision.transforms.v2`` on
``tv_tensors.BoundingBoxes``), so faces keep the scale they have at serving time while an epoch
costs less than full canvases. AdamW with warm-up + cosine, an exponential moving average of the
weights (exported), bf16 autocast and channels-last on the CPU.

Evaluation uses torchmetrics' ``MeanAveragePrecision`` (pycocotools backend): VOC-style AP at
IoU 0.5 and COCO AP@[.5:.95], per class and class-agnostic ("any face": a location's score is
the SUM of its class scores, i.e. its objectness; NMS ignores labels).
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_iou
from torchvision.transforms import v2

from service.images import decode_image
from service.manifest import InputSpec, Manifest, Task
from service.runtime import OnnxModel
from service.settings import Settings
from service.tasks import detection
from training.datasets.voc import BoxedImage, class_names, load_boxes, make_split, read_split, write_split
from training.engine import fit, start_run
from training.export import OrtParity, ParityError, export_onnx, fit_record, metrics_table, write_model_folder
from training.losses import DetectionLoss
from training.nets.yolo import YoloDetector

SPLITS = Path(__file__).resolve().parent / "splits"
EVAL_SCORE_THRESHOLD = 0.001  # AP needs the whole precision/recall curve
MAX_DETECTIONS = 300  # serving default: some facemask photos hold 115 faces (AP uses COCO's standard 100)
GRAPH_TOLERANCE = 2e-3  # |ORT - PyTorch| on raw outputs (box pixels and scores)
BOX_TOLERANCE_PX = 1.0  # served vs PyTorch-reference detections, original pixels
SCORE_TOLERANCE = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/facemask"))
    parser.add_argument("--name", default="facemask-detector")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and logs")
    parser.add_argument("--split", type=Path, default=None, help="split file; default training/splits/<dataset>.json")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="when there is no split file")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="of the training images, for monitoring")
    parser.add_argument("--image-size", type=int, default=416, help="the letterboxed square input")
    parser.add_argument("--crop", type=int, default=320, help="training crop side")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=3.0)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--widths", type=int, nargs=4, default=(32, 64, 128, 192), help="channels at strides 4, 8, 16, 32")
    parser.add_argument("--depths", type=int, nargs=4, default=(0, 2, 2, 1), help="CSP bottlenecks per stage")
    parser.add_argument("--neck-width", type=int, default=64)
    parser.add_argument("--strides", type=int, nargs="+", default=(8, 16))
    parser.add_argument("--scale-jitter", type=float, nargs=2, default=(0.6, 1.4))
    parser.add_argument("--limit", type=int, default=None, help="first N training images (smoke runs)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="augmentation processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N epochs (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (slower)")


# --- data -------------------------------------------------------------------------------------


class Cached:
    """Letterboxed uint8 canvases ``[N, 3, S, S]`` with boxes in canvas and in original pixels."""

    def __init__(self, samples: list[BoxedImage], classes: list[str], size: int, mean: list[float]) -> None:
        self.samples = samples
        fill = detection.fill_color(mean)
        canvases, self.boxes, self.labels, self.letterboxes = [], [], [], []
        for sample in samples:
            with Image.open(sample.path) as image:
                canvas, box = detection.letterbox_image(image.convert("RGB"), (size, size), fill)
            canvases.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1))
            scale = np.array([box.scale_x, box.scale_y, box.scale_x, box.scale_y], np.float32)
            pad = np.array([box.pad_x, box.pad_y, box.pad_x, box.pad_y], np.float32)
            self.boxes.append(torch.from_numpy(sample.boxes * scale + pad))
            self.labels.append(torch.tensor([classes.index(n) for n in sample.names], dtype=torch.long))
            self.letterboxes.append(box)
        self.images = torch.stack(canvases) if canvases else torch.zeros(0, 3, size, size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Ground truth in original pixels, for torchmetrics."""
        return [
            {"boxes": torch.from_numpy(s.boxes).float(), "labels": labels}
            for s, labels in zip(self.samples, self.labels, strict=True)
        ]


def channel_stats(samples: list[BoxedImage], step: int = 4) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images' pixels (every ``step``-th image)."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for sample in samples[::step]:
        with Image.open(sample.path) as image:
            pixels = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3) / 255
        total += pixels.sum(0)
        squares += np.square(pixels).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(squares / count - mean**2)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


class Augmented(Dataset):
    """Random crops of the cached canvases after flip, scale and colour jitter (v2 transforms)."""

    def __init__(self, cached: Cached, crop: int, scale_range: tuple[float, float], fill: tuple[int, ...]) -> None:
        self.cached = cached
        size = cached.images.shape[-1]
        self.transform = v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.ScaleJitter((size, size), scale_range=scale_range, antialias=True),
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: list(fill), "others": 0}),
                v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4),
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(min_size=2.0),
            ]
        )

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(self.cached.images[index])
        size = tuple(image.shape[-2:])
        boxes = tv_tensors.BoundingBoxes(self.cached.boxes[index], format="XYXY", canvas_size=size)
        out = self.transform({"image": image, "boxes": boxes, "labels": self.cached.labels[index]})
        return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Images stacked; boxes and labels padded to the most crowded image, with a validity mask."""
    most = max(len(boxes) for _, boxes, _ in batch)
    gt_boxes = torch.zeros(len(batch), most, 4)
    gt_labels = torch.zeros(len(batch), most, dtype=torch.long)
    gt_valid = torch.zeros(len(batch), most, dtype=torch.bool)
    for i, (_, boxes, labels) in enumerate(batch):
        gt_boxes[i, : len(boxes)], gt_labels[i, : len(boxes)], gt_valid[i, : len(boxes)] = boxes, labels, True
    return torch.stack([image for image, _, _ in batch]), gt_boxes, gt_labels, gt_valid


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the main process's threads own the cores for training


# --- post-processing (the PyTorch reference for the service's numpy version) -----------------


def reference_select(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    agnostic: bool = False,
    pre_nms_top_k: int = detection.PRE_NMS_TOP_K,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``boxes [A, 4]``, ``scores [A, C]`` -> ``(boxes, scores, labels)`` after threshold
    and class-aware (or agnostic) NMS with ``torchvision.ops.batched_nms``; boxes in input pixels."""
    if agnostic:
        total = scores.sum(1)
        anchor = torch.nonzero(total >= score_threshold).flatten()
        score, label = total[anchor], scores[anchor].argmax(1)
    else:
        anchor, label = torch.nonzero(scores >= score_threshold, as_tuple=True)
        score = scores[anchor, label]
    if score_threshold <= 0:
        positive = score > 0
        anchor, label, score = anchor[positive], label[positive], score[positive]
    if len(score) > pre_nms_top_k:
        top = torch.sort(score, descending=True, stable=True).indices[:pre_nms_top_k]
        anchor, label, score = anchor[top], label[top], score[top]
    candidates = boxes[anchor]
    keep = batched_nms(candidates, score, torch.zeros_like(label) if agnostic else label, iou_threshold)[:max_detections]
    return candidates[keep], score[keep], label[keep]


def reference_to_original(boxes: torch.Tensor, box: detection.Letterbox) -> torch.Tensor:
    x = ((boxes[:, [0, 2]] - box.pad_x) / box.scale_x).clamp(0, box.width)
    y = ((boxes[:, [1, 3]] - box.pad_y) / box.scale_y).clamp(0, box.height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)


def _as_prediction(boxes: Any, scores: Any, labels: Any, agnostic: bool) -> dict[str, torch.Tensor]:
    labels = torch.as_tensor(labels).long()
    return {
        "boxes": torch.as_tensor(boxes).float().reshape(-1, 4),
        "scores": torch.as_tensor(scores).float(),
        "labels": torch.zeros_like(labels) if agnostic else labels,
    }


def detection_metrics(
    predictions: list[dict[str, torch.Tensor]],
    agnostic_predictions: list[dict[str, torch.Tensor]],
    targets: list[dict[str, torch.Tensor]],
    classes: list[str],
) -> dict[str, float]:
    """AP@0.5 and COCO AP@[.5:.95], per class, over the classes and class-agnostic ("any")."""
    from torchmetrics.detection import MeanAveragePrecision

    # More than 100 detections in crowded photos is expected: COCO's rule keeps the best 100.
    coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True)
    voc = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, iou_thresholds=[0.5])
    agnostic = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    for metric in (coco, voc, agnostic):
        metric.warn_on_many_detections = False
    coco.update(predictions, targets)
    voc.update(predictions, targets)
    agnostic.update(agnostic_predictions, [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets])
    c, v, a = coco.compute(), voc.compute(), agnostic.compute()
    metrics = {
        "any_ap50": float(a["map_50"]),
        "any_ap": float(a["map"]),
        "map50": float(c["map_50"]),
        "map": float(c["map"]),
    }
    for name, prefix in ((v, "ap50"), (c, "ap")):
        present = name["classes"].flatten().tolist()
        per_class = name["map_per_class"].flatten().tolist()
        for index, value in zip(present, per_class, strict=True):
            metrics[f"{prefix}_{classes[index]}"] = float(value)
    return metrics


def best_f1_threshold(predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """The score threshold with the best F1 for finding objects at IoU 0.5, labels ignored (greedy matching by score)."""
    thresholds = np.round(np.arange(0.05, 0.951, 0.025), 3)
    tp, fp = np.zeros(len(thresholds)), np.zeros(len(thresholds))
    gt_total = sum(len(t["boxes"]) for t in targets)
    for prediction, target in zip(predictions, targets, strict=True):
        order = torch.argsort(prediction["scores"], descending=True)
        boxes, scores = prediction["boxes"][order], prediction["scores"][order].numpy()
        iou = box_iou(boxes, target["boxes"]).numpy() if len(boxes) and len(target["boxes"]) else np.zeros((len(boxes), 0))
        taken = np.zeros(iou.shape[1], bool)
        hit = np.zeros(len(boxes), bool)
        for i in range(len(boxes)):
            if iou.shape[1]:
                candidates = np.where(taken, -1.0, iou[i])
                j = int(candidates.argmax())
                if candidates[j] >= 0.5:
                    taken[j] = hit[i] = True
        above = scores[None, :] >= thresholds[:, None]
        tp += (above & hit[None, :]).sum(1)
        fp += (above & ~hit[None, :]).sum(1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (gt_total - tp), 1)
    best = int(f1.argmax())
    return float(thresholds[best]), float(f1[best])


# --- the recipe -------------------------------------------------------------------------------


class ModelEma:
    """Exponential moving average of all float weights and buffers (what gets evaluated and exported)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / 200))  # short memory while the weights move fast
        for average, value in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(value, 1 - decay)
            else:
                average.copy_(value)


class DetectorRecipe:
    def __init__(
        self, args: argparse.Namespace, train: Cached, val: Cached, classes: list[str], mean: list[float], std: list[float]
    ):
        self.args, self.train, self.val, self.classes = args, train, val, classes
        self.autocast = not args.no_bf16
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.model = YoloDetector(
            len(classes),
            tuple(args.widths),
            tuple(args.depths),
            args.neck_width,
            tuple(args.strides),
            (args.image_size, args.image_size),
        ).to(memory_format=torch.channels_last)
        self.ema = ModelEma(self.model, args.ema_decay)
        self.loss = DetectionLoss()
        self.dataset = Augmented(train, args.crop, tuple(args.scale_jitter), detection.fill_color(mean))
        self.steps_per_epoch = max(1, len(train) // args.batch_size)
        self.total_steps = self.steps_per_epoch * args.epochs
        self.step = 0
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]  # conv weights; not BN or biases
        rest = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=args.lr
        )

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def lr_factor(self, step: int) -> float:
        warmup = max(1, int(self.args.warmup_epochs * self.steps_per_epoch))
        if step < warmup:
            return 0.02 + 0.98 * step / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def train_batches(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed * 1000 + epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.args.batch_size,
            shuffle=True,
            drop_last=len(self.train) >= self.args.batch_size,
            collate_fn=collate,
            num_workers=self.args.workers,
            worker_init_fn=_worker_init if self.args.workers else None,
            generator=generator,
        )

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        images, gt_boxes, gt_labels, gt_valid = batch
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.lr_factor(self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            predictions, centres, strides = self.model.raw(self.normalise(images))
        boxes = YoloDetector.decode_boxes(predictions, centres, strides)
        loss, parts = self.loss(predictions, boxes, centres, strides, gt_boxes, gt_labels, gt_valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return {"loss": loss.item(), **parts}

    def end_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def raw_outputs(self, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA model's ``boxes [N, A, 4]`` and ``scores [N, A, C]`` on canvases."""
        model = self.ema.model.eval()
        boxes, scores = [], []
        for i in range(0, len(images), batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                b, s = model(self.normalise(images[i : i + batch]))
            boxes.append(b.float())
            scores.append(s.float())
        return torch.cat(boxes), torch.cat(scores)

    def detect(self, data: Cached, iou_threshold: float) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        """Class-aware and agnostic detections (original pixels) for every image, for AP."""
        boxes, scores = self.raw_outputs(data.images)
        aware, agnostic = [], []
        for b, s, box in zip(boxes, scores, data.letterboxes, strict=True):
            for out, flag in ((aware, False), (agnostic, True)):
                kept, score, label = reference_select(b, s, EVAL_SCORE_THRESHOLD, iou_threshold, MAX_DETECTIONS, flag)
                out.append(_as_prediction(reference_to_original(kept, box), score, label, flag))
        return aware, agnostic

    def evaluate(self) -> dict[str, float]:
        if not len(self.val):
            return {}
        aware, agnostic = self.detect(self.val, 0.5)
        metrics = detection_metrics(aware, agnostic, self.val.targets(), self.classes)
        return {key: metrics[key] for key in ("any_ap50", "map50", "map")}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]


# --- splits, export, card ---------------------------------------------------------------------


def load_splits(args: argparse.Namespace) -> tuple[list[BoxedImage], list[BoxedImage], list[BoxedImage], str]:
    """Train / validation (seeded part of train) / test samples and a description of the split."""
    samples = load_boxes(args.data_dir)
    by_key = {s.key: s for s in samples}
    split_path = args.split or SPLITS / f"{args.data_dir.name}.json"
    if split_path.is_file():
        split = read_split(split_path)
        missing = [k for k in split["train"] + split["test"] if k not in by_key]
        if missing:
            raise ValueError(f"{split_path} lists {len(missing)} images not in {args.data_dir}, e.g. {missing[:3]}")
        described = f"{split_path.name} ({len(split['test'])} test images)"
    else:
        split = make_split(sorted(by_key), args.seed, args.test_fraction)
        write_split(args.runs_dir / args.name / "split.json", split, seed=args.seed, test_fraction=args.test_fraction)
        described = f"seeded {args.test_fraction:.0%} of images (seed {args.seed})"
    train_keys = list(split["train"])
    np.random.default_rng(args.seed).shuffle(train_keys)
    held = round(len(train_keys) * args.val_fraction)
    val_keys, train_keys = sorted(train_keys[:held]), sorted(train_keys[held:])
    test_keys = split["test"]
    if args.limit:
        train_keys, val_keys, test_keys = (
            train_keys[: args.limit],
            val_keys[: max(2, args.limit // 4)],
            test_keys[: max(2, args.limit // 4)],
        )
    pick = lambda keys: [by_key[k] for k in keys]  # noqa: E731
    return pick(train_keys), pick(val_keys), pick(test_keys), described


def _served(session: OnnxModel, manifest: Manifest, paths: list[Path]) -> list[tuple[np.ndarray, ...]]:
    """The service's pipeline on files: decode (EXIF) -> letterbox -> ORT -> raw outputs + letterbox."""
    out = []
    for path in paths:
        image = decode_image(path.read_bytes(), 10**9, manifest.input.color)
        inputs, box = detection.preprocess(image, manifest)
        boxes, scores = session.run(inputs)
        out.append((inputs, boxes[0], scores[0], box))
    return out


def _compare(
    served: tuple[np.ndarray, np.ndarray, np.ndarray], reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[int, float, float, int]:
    """Match served detections to reference ones (same label, nearest box): count, worst box px, worst score, unmatched."""
    s_boxes, s_scores, s_labels = served
    r_boxes, r_scores, r_labels = (t.numpy() for t in reference)
    worst_px = worst_score = 0.0
    unmatched = abs(len(s_boxes) - len(r_boxes))
    used = np.zeros(len(r_boxes), bool)
    for box, score, label in zip(s_boxes, s_scores, s_labels, strict=True):
        distance = np.where((r_labels == label) & ~used, np.abs(r_boxes - box).max(1) if len(r_boxes) else 0, np.inf)
        if not len(distance) or not np.isfinite(distance.min()):
            unmatched += 1
            continue
        j = int(distance.argmin())
        used[j] = True
        worst_px = max(worst_px, float(distance[j]))
        worst_score = max(worst_score, abs(float(score) - float(r_scores[j])))
    return len(s_boxes), worst_px, worst_score, unmatched


SIZE_BINS = (0, 8, 12, 16, 24, 32, 64)


def recall_by_size(found: list[np.ndarray], test: list[BoxedImage]) -> dict[str, float]:
    """Recall (IoU >= 0.5, labels ignored) per object size, sqrt(area) in original pixels, and each bin's share."""
    sides, hits = [], []
    for boxes, sample in zip(found, test, strict=True):
        side = np.sqrt((sample.boxes[:, 2] - sample.boxes[:, 0]) * (sample.boxes[:, 3] - sample.boxes[:, 1]))
        overlap = box_iou(torch.from_numpy(sample.boxes), torch.from_numpy(boxes)) if len(boxes) else None
        best = overlap.amax(1).numpy() if overlap is not None else np.zeros(len(side))
        sides.append(side)
        hits.append(best >= 0.5)
    side, hit = np.concatenate(sides), np.concatenate(hits)
    out: dict[str, float] = {}
    for low, high in zip(SIZE_BINS, (*SIZE_BINS[1:], np.inf), strict=True):
        chosen = (side >= low) & (side < high)
        name = f"{low}-{high:g}px" if np.isfinite(high) else f">={low}px"
        out[f"recall_{name}"] = round(float(hit[chosen].mean()), 4) if chosen.any() else float("nan")
        out[f"share_{name}"] = round(float(chosen.mean()), 4)
    return out


def measure_latency(onnx_path: Path, manifest: Manifest, photo: Path, threads: int, repeats: int = 30) -> dict[str, float]:
    """Median ms for one 640-px JPEG through decode + letterbox + graph + NMS, and for the graph alone,
    with ONNX Runtime on ``threads`` threads and the service's session options."""
    session = OnnxModel(onnx_path, manifest.input.name, list(manifest.outputs.values()), threads=threads)
    with Image.open(photo) as image:
        image = image.convert("RGB")
        scale = 640 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    defaults = manifest.defaults

    def pipeline() -> None:
        decoded = decode_image(data, 10**9, "RGB", draft_size=manifest.input.size)
        inputs, box = detection.preprocess(decoded, manifest)
        boxes, scores = session.run(inputs)
        kept, _, _ = detection.select(
            boxes[0], scores[0], defaults["score_threshold"], defaults["iou_threshold"], defaults["max_detections"]
        )
        detection.to_original(kept, box, image.size)

    inputs, _ = detection.preprocess(image, manifest)
    timings: dict[str, list[float]] = {"pipeline": [], "graph": []}
    for _ in range(5):
        pipeline()
    for _ in range(repeats):
        started = time.perf_counter()
        pipeline()
        timings["pipeline"].append(time.perf_counter() - started)
        started = time.perf_counter()
        session.run(inputs)
        timings["graph"].append(time.perf_counter() - started)
    return {
        "latency_640px_ms": round(statistics.median(timings["pipeline"]) * 1000, 2),
        "latency_graph_ms": round(statistics.median(timings["graph"]) * 1000, 2),
        "latency_image": f"{image.width}x{image.height} JPEG",
    }


def export(
    recipe: DetectorRecipe,
    args: argparse.Namespace,
    seconds: float,
    test: list[BoxedImage],
    split: str,
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    """Export the EMA model, check it against PyTorch, evaluate the served pipeline on the test split."""
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    size = args.image_size
    served_model = copy.deepcopy(recipe.ema.model).eval().float().to(memory_format=torch.contiguous_format)
    export_onnx(served_model, torch.zeros(2, 3, size, size), onnx_path, output_names=["boxes", "scores"])

    # Validation (never test) picks the serving score threshold: the best F1 of what /v1/detect
    # returns by default (class-aware detections), counting an object as found whatever its label.
    val_aware, val_agnostic = recipe.detect(recipe.val, 0.5)
    val_targets = recipe.val.targets()
    threshold, val_f1 = best_f1_threshold(val_aware, val_targets) if len(recipe.val) else (0.3, float("nan"))
    val_metrics = detection_metrics(val_aware, val_agnostic, val_targets, recipe.classes) if len(recipe.val) else {}
    defaults = {
        "score_threshold": threshold,
        "iou_threshold": 0.5,
        "max_detections": MAX_DETECTIONS,
        "any_object_score": "sum",  # a location's score for "any class" = sum over classes = objectness
    }
    manifest = Manifest(
        name=args.name,
        task=Task.detection,
        version="1",
        sha256="0" * 64,
        input=InputSpec(name="input", color="RGB", size=(size, size), resize="letterbox", mean=mean, std=std),
        outputs={"boxes": "boxes", "scores": "scores"},
        labels=recipe.classes,
        defaults=defaults,
    )

    # Parity: the graph under ORT vs PyTorch on every test image (raw outputs), then the service's
    # numpy post-processing vs the torchvision reference on the same outputs, at serving defaults.
    parity = OrtParity(served_model, onnx_path, GRAPH_TOLERANCE)
    session = OnnxModel(onnx_path, "input", ["boxes", "scores"], threads=torch.get_num_threads())
    served = _served(session, manifest, [s.path for s in test])
    aware, agnostic = [], []
    compared = unmatched = 0
    worst_px = worst_score = 0.0
    found_at_default: list[np.ndarray] = []
    for inputs, boxes, scores, box in served:
        (torch_boxes, torch_scores), _ = parity.run(torch.from_numpy(inputs))
        kept, score, label = detection.select(boxes, scores, threshold, 0.5, MAX_DETECTIONS)
        reference = reference_select(
            torch.from_numpy(torch_boxes[0]), torch.from_numpy(torch_scores[0]), threshold, 0.5, MAX_DETECTIONS
        )
        found_at_default.append(detection.to_original(kept, box))
        n, px, sc, un = _compare(
            (detection.to_original(kept, box), score, label),
            (reference_to_original(reference[0], box), reference[1], reference[2]),
        )
        compared, unmatched, worst_px, worst_score = compared + n, unmatched + un, max(worst_px, px), max(worst_score, sc)
        for out, flag in ((aware, False), (agnostic, True)):
            k, s, lab = detection.select(boxes, scores, EVAL_SCORE_THRESHOLD, 0.5, MAX_DETECTIONS, agnostic=flag)
            out.append(_as_prediction(detection.to_original(k, box), s, lab, flag))
    parity.check()
    if unmatched or worst_px > BOX_TOLERANCE_PX or worst_score > SCORE_TOLERANCE:
        raise ParityError(
            f"served detections differ from the PyTorch reference: {unmatched} unmatched, {worst_px:.3g} px, {worst_score:.3g}"
        )

    targets = [
        {"boxes": torch.from_numpy(s.boxes).float(), "labels": torch.tensor([recipe.classes.index(n) for n in s.names])}
        for s in test
    ]
    test_metrics = detection_metrics(aware, agnostic, targets, recipe.classes)
    metrics: dict[str, Any] = {
        "dataset": args.data_dir.name,
        "split": split,
        "images": len(test),
        "objects": sum(len(s.boxes) for s in test),
        **{k: round(v, 4) for k, v in test_metrics.items()},
        "val_images": len(recipe.val),
        **{f"val_{k}": round(v, 4) for k, v in val_metrics.items() if k in ("any_ap50", "map50", "map")},
        "val_best_f1": round(val_f1, 4),
        "parity_max_abs_graph_diff": parity.max_abs_diff,
        "parity_detections": compared,
        "parity_max_box_px": worst_px,
        "parity_max_score_diff": worst_score,
        "recall_at_default": recall_by_size(found_at_default, test),
    }
    # The service runs ONNX Runtime on every core by default; one thread is the busy-machine case.
    cores = Settings(_env_file=None).intra_op_threads
    metrics.update(measure_latency(onnx_path, manifest, test[0].path, cores))
    metrics["latency_threads"] = cores
    single = measure_latency(onnx_path, manifest, test[0].path, 1)
    metrics["latency_640px_ms_1thread"] = single["latency_640px_ms"]
    metrics["latency_graph_ms_1thread"] = single["latency_graph_ms"]
    manifest.metrics = metrics
    manifest.training = fit_record(
        args,
        seconds,
        train_images=len(recipe.train),
        val_images=len(recipe.val),
    )
    card = model_card(args, manifest, recipe)
    write_model_folder(args.models_dir / args.name, onnx_path, manifest, card, run_dir / "curves.png")
    return metrics


def model_card(args: argparse.Namespace, manifest: Manifest, recipe: DetectorRecipe) -> str:
    params = sum(p.numel() for p in recipe.model.parameters())
    m, t, d = manifest.metrics, manifest.training, manifest.defaults
    by_size = m["recall_at_default"]
    bins = [key.removeprefix("recall_") for key in by_size if key.startswith("recall_")]
    size_rows = "\n".join(f"| {b} | {by_size[f'share_{b}']:.1%} | {by_size[f'recall_{b}']:.2f} |" for b in bins)
    per_class = "\n".join(
        f"| {name} | {m.get(f'ap50_{name}', float('nan')):.4f} | {m.get(f'ap_{name}', float('nan')):.4f} |"
        for name in manifest.labels
    )
    size = (args.runs_dir / args.name / "model.onnx").stat().st_size
    locations = sum((args.image_size // s) ** 2 for s in args.strides)
    return f"""# {manifest.name}

One-stage object detector ({len(manifest.labels)} classes: {", ".join(manifest.labels)}), trained from scratch.

## Result (held-out test split, ONNX Runtime + the service's post-processing)
{m["images"]} test images with {m["objects"]} objects ({m["split"]} of `{m["dataset"]}`):

- class-agnostic ("any object") AP@0.5: **{m["any_ap50"]:.4f}**, AP@[.5:.95]: {m["any_ap"]:.4f}
- {len(manifest.labels)}-class mAP@0.5: **{m["map50"]:.4f}**, COCO mAP@[.5:.95]: {m["map"]:.4f}

| class | AP@0.5 | AP@[.5:.95] |
| --- | --- | --- |
{per_class}

AP is torchmetrics' `MeanAveragePrecision` (pycocotools backend: 101-point interpolation, COCO's
standard 100 best detections per image, score threshold {EVAL_SCORE_THRESHOLD}, NMS IoU 0.5).
"Any object" scores a location by the SUM of its class scores (= its objectness) with
label-blind NMS; for a face-mask detector that is "any face".

Latency: {m["latency_640px_ms"]} ms for one {m["latency_image"]} (decode + letterbox + graph + NMS), of
which the graph {m["latency_graph_ms"]} ms; ONNX Runtime on {m["latency_threads"]} CPU threads (on one thread:
{m["latency_640px_ms_1thread"]} ms, graph {m["latency_graph_ms_1thread"]} ms).

{metrics_table({key: value for key, value in m.items() if not isinstance(value, dict)})}

## Serving
Input {args.image_size}x{args.image_size} RGB, letterboxed (aspect kept, centred on the training
mean colour), normalised by the training images' mean/std. Outputs `boxes [N, A, 4]` (x1 y1 x2 y2,
input pixels) and `scores [N, A, C]` = sigmoid(objectness) x softmax(class), A = {locations} locations.
Thresholds and class-aware NMS run in the service. Defaults: score {d["score_threshold"]} (the best F1
of the default, class-aware output on the validation images, an object counting as found whatever
its label: F1 {m["val_best_f1"]:.3f}), IoU {d["iou_threshold"]},
at most {d["max_detections"]} detections. Served detections equal a torchvision reference
post-processing of the PyTorch model on every test image: {m["parity_detections"]} detections,
worst box difference {m["parity_max_box_px"]:.2g} px, worst score difference {m["parity_max_score_diff"]:.2g}.

## Model
`training/nets/yolo.py`: CSP backbone widths {list(args.widths)}, depths {list(args.depths)}, FPN width
{args.neck_width}, dense heads at strides {list(args.strides)}; {params / 1e6:.2f} M parameters, {size / 1e6:.1f} MB ONNX.
Loss (`training/losses.py`): centre-prior assignment (the 2x2 cells nearest an object's centre,
on the scale suited to its size), complete-IoU box loss, sigmoid focal loss for objectness,
cross-entropy for the class.

## Training
- data: `{t["data"]}`, {t["train_images"]} training images, {t["val_images"]} validation images held out of
  the training split (monitoring and the score threshold); the test split was used only for this report,
  and the exported weights are the EMA after the last epoch.
- {args.epochs} epochs, batch {args.batch_size}, {args.crop}-px crops, AdamW (lr {args.lr}, weight decay
  {args.weight_decay}), {args.warmup_epochs:g}-epoch warm-up then cosine, EMA {args.ema_decay}; flip, scale jitter
  {list(args.scale_jitter)}, colour jitter; bf16 autocast: {not args.no_bf16}.
- wall time (training only): {t["seconds"]:.0f} s on {t["threads"]} CPU thread(s); seed {t["seed"]}.
- command: `{t["command"]}`, commit `{t["commit"]}` (with `--resume`, a finished run is only
  re-exported from its last checkpoint; without a checkpoint the same command trains from scratch).

## Limits
- Small objects are missed most: recall at the default threshold (IoU >= 0.5, labels ignored) on the
  test split by object size (sqrt of the box area, original pixels); the finest grid has stride 8.

| size | share of objects | recall |
| --- | --- | --- |
{size_rows}

- `mask_weared_incorrect` has 123 examples in the whole data set (about 100 for training), so its AP
  is the least certain number here; the validation split (68 images) is small and its AP is noisy.

![curves](curves.png)
"""


def main(args: argparse.Namespace) -> None:
    start_run(args.seed, args.threads)
    train_samples, val_samples, test_samples, split = load_splits(args)
    classes = class_names(train_samples + val_samples + test_samples)
    mean, std = channel_stats(train_samples)
    started = time.perf_counter()
    train, val = Cached(train_samples, classes, args.image_size, mean), Cached(val_samples, classes, args.image_size, mean)
    print(
        f"{len(train)} training / {len(val)} validation / {len(test_samples)} test images ({split}), "
        f"classes {classes}; cached in {time.perf_counter() - started:.1f} s"
    )
    recipe = DetectorRecipe(args, train, val, classes, mean, std)
    result = fit(
        recipe, args.epochs, args.runs_dir / args.name, resume=args.resume, eval_every=args.eval_every, stop_after=args.stop_after
    )
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    metrics = export(recipe, args, result.seconds, test_samples, split, mean, std)
    print(
        f"exported {args.models_dir / args.name}: any-object AP@0.5 {metrics['any_ap50']:.4f}, mAP@0.5 {metrics['map50']:.4f}, "
        f"COCO mAP {metrics['map']:.4f}; {metrics['latency_640px_ms']} ms per 640-px image; {result.seconds:.0f} s training"
    )
