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

Several sources train one model: repeat ``--data-dir`` and usually ``--merge-labels``::

    python -m training detector --data-dir ../shared/datasets/facemask --data-dir ../shared/datasets/lfw \
        --merge-labels face --name face-detector --check-dir ../shared/datasets/att_faces

Each source keeps its own split. LFW (a folder with ``landmarks.txt``) gives one square ``face``
box per photo from its landmarks; the people of ``pairs/pairsDevTest.txt`` are its test set and
are never trained on, and a seeded part of the other people is held out for validation. LFW's
faces are all big and centred, so its photos are re-framed on the fly (:class:`Portraits`): the
face gets a random size from small to larger than the crop and a random place. ``--epoch-images``
sets how many photos each source gives an epoch, ``--grayscale`` converts some crops to gray.
The first source's test split gives the headline metrics; every other source's test split and
every ``--check-dir`` (photos of one object each, never trained on) are reported beside them.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from service.images import Span, decode_for_graph
from service.manifest import InputSpec, Manifest, Task
from service.runtime import OnnxModel
from service.settings import DEFAULT_MODELS, Settings
from service.tasks import detection
from training.datasets import MAX_PIXELS, ChannelStatistics, is_photo, read_photo
from training.datasets.copies import copies_note, copies_of_training, copies_warning
from training.datasets.lfw import boxed_faces, pair_people, read_pairs
from training.datasets.voc import BoxedImage, class_names, load_boxes, make_split, read_split, write_split
from training.engine import FitResult, bf16_autocast, fit, start_run
from training.export import OrtParity, ParityError, export_onnx, fit_record, metrics_table, write_model_folder
from training.losses import DetectionLoss
from training.nets.yolo import YoloDetector

SPLITS = Path(__file__).resolve().parent / "splits"
EVAL_SCORE_THRESHOLD = 0.001  # AP needs the whole precision/recall curve
MAX_DETECTIONS = 300  # serving default: some facemask photos hold 115 faces (AP uses COCO's standard 100)
GRAPH_TOLERANCE = 2e-3  # |ORT - PyTorch| on raw outputs (box pixels and scores)
BOX_TOLERANCE_PX = 1.0  # served vs PyTorch-reference detections, original pixels
SCORE_TOLERANCE = 1e-3
DEFAULT_DATA = Path("../shared/datasets/facemask")
LFW_VAL_IMAGES = 300  # held-out LFW photos: plenty for a threshold, cheap to evaluate every few epochs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        action="append",
        default=None,
        help=f"a data folder; repeat it to train on several (default {DEFAULT_DATA})",
    )
    parser.add_argument("--merge-labels", default=None, metavar="NAME", help="every class of every source becomes NAME")
    parser.add_argument(
        "--epoch-images", type=int, nargs="+", default=None, help="photos drawn per epoch from each source (default: all)"
    )
    parser.add_argument("--grayscale", type=float, default=0.0, help="probability that a training crop is turned gray")
    parser.add_argument(
        "--portrait-sizes",
        type=float,
        nargs=2,
        default=(32.0, 352.0),
        help="LFW: the face's longer side in the crop, pixels (log-uniform)",
    )
    parser.add_argument(
        "--check-dir",
        type=Path,
        action="append",
        default=[],
        help="photos of one object each (e.g. att_faces), never trained on: the card reports how many get a detection",
    )
    parser.add_argument("--name", default="facemask-detector")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="the model repository the service reads")
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
    parser.add_argument(
        "--limit", type=int, default=None, help="smoke runs: first N training images, and N/4 (at least 2) validation and test"
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="augmentation processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0, help="draws the held-out splits (apart from --seed)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="end after epoch N of the schedule (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (the default where the CPU has no bf16 kernels)")


# --- data -------------------------------------------------------------------------------------


class Cached:
    """Letterboxed uint8 canvases ``[N, 3, S, S]`` with boxes in canvas and in original pixels."""

    def __init__(self, samples: list[BoxedImage], classes: list[str], size: int, mean: list[float]) -> None:
        self.samples = samples
        fill = detection.fill_color(mean)
        canvases, self.boxes, self.labels, self.letterboxes = [], [], [], []
        for sample in samples:
            canvas, box = detection.letterbox_image(read_photo(sample.path, "RGB"), (size, size), fill)
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
    statistics = ChannelStatistics()
    for sample in samples[::step]:
        statistics.add(np.asarray(read_photo(sample.path, "RGB")))
    mean, std = statistics.result()
    return [round(v, 6) for v in mean], [round(v, 6) for v in std]


class Augmented(Dataset):
    """Random crops of the cached canvases after flip, scale and colour jitter (v2 transforms)."""

    def __init__(
        self, cached: Cached, crop: int, scale_range: tuple[float, float], fill: tuple[int, ...], grayscale: float = 0.0
    ) -> None:
        self.cached = cached
        size = cached.images.shape[-1]
        self.transform = v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.ScaleJitter((size, size), scale_range=scale_range, antialias=True),
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: list(fill), "others": 0}),
                *photometric(grayscale),
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


def photometric(grayscale: float) -> list[v2.Transform]:
    """Colour jitter (+ optional gray), then boxes clipped to the crop and slivers dropped."""
    gray = [v2.RandomGrayscale(grayscale)] if grayscale > 0 else []  # 3 gray channels, as the service decodes a gray photo
    return [
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4),
        *gray,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=2.0),
    ]


class Portraits(Dataset):
    """Photos of one big centred face (LFW), re-framed so the face takes any size and place in the crop.

    The face's longer side is drawn log-uniformly from ``sizes`` (crop pixels): small faces on a
    canvas of the mean colour (as a letterboxed photo's padding looks when served), up to a face
    larger than the crop and cut by its edges (a passport photo; AT&T's 92x112 faces). A face that
    fits lies wholly inside the crop; a larger one covers the crop on that axis. Photos are decoded
    here (LFW's are 160x160 JPEGs: cheap), so ten thousand of them cost no memory.
    """

    def __init__(
        self,
        samples: list[BoxedImage],
        classes: list[str],
        crop: int,
        sizes: tuple[float, float],
        fill: tuple[int, ...],
        grayscale: float = 0.0,
    ) -> None:
        self.samples, self.crop, self.fill = samples, crop, list(fill)
        self.log_sizes = (math.log(sizes[0]), math.log(sizes[1]))
        self.labels = [torch.tensor([classes.index(n) for n in s.names], dtype=torch.long) for s in samples]
        self.flip = v2.RandomHorizontalFlip()
        self.finish = v2.Compose(photometric(grayscale))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        pixels = torch.from_numpy(np.asarray(read_photo(sample.path, "RGB")).copy()).permute(2, 0, 1)
        height, width = pixels.shape[-2:]
        data = self.flip(
            {
                "image": tv_tensors.Image(pixels),
                "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(sample.boxes), format="XYXY", canvas_size=(height, width)),
                "labels": self.labels[index],
            }
        )
        chosen = int(torch.randint(len(sample.boxes), ()))  # the face that sets the scale and the place
        side = float((data["boxes"][chosen, 2:] - data["boxes"][chosen, :2]).max())
        low, high = self.log_sizes
        scale = math.exp(low + (high - low) * float(torch.rand(()))) / max(side, 1.0)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image, boxes = F.resize(data["image"], size, antialias=True), F.resize(data["boxes"], size)
        face = boxes[chosen]
        # The crop window's origin in the resized photo: room < 0 (face larger than the crop) puts
        # the face's edges outside the window, room >= 0 puts the whole face inside it.
        left, top = (
            round(float(face[axis]) - float(torch.rand(())) * (self.crop - float(face[axis + 2] - face[axis]))) for axis in (0, 1)
        )
        pad = [max(0, -left), max(0, -top), max(0, left + self.crop - size[1]), max(0, top + self.crop - size[0])]
        if any(pad):
            image, boxes = F.pad(image, pad, fill=self.fill), F.pad(boxes, pad)
        image = F.crop(image, top + pad[1], left + pad[0], self.crop, self.crop)
        boxes = F.crop(boxes, top + pad[1], left + pad[0], self.crop, self.crop)
        out = self.finish({"image": image, "boxes": boxes, "labels": data["labels"]})
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
    content: detection.Letterbox | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``boxes [A, 4]``, ``scores [A, C]`` -> ``(boxes, scores, labels)`` after threshold
    and class-aware (or agnostic) NMS with ``torchvision.ops.batched_nms``; boxes in input pixels.
    ``content``: as the service, boxes wholly in the letterbox's padding are dropped before NMS."""
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
    if content is not None:
        inside = torch.from_numpy(detection.overlaps_image(boxes[anchor].numpy(), content))
        anchor, label, score = anchor[inside], label[inside], score[inside]
    if len(score) > pre_nms_top_k:
        top = torch.sort(score, descending=True, stable=True).indices[:pre_nms_top_k]
        anchor, label, score = anchor[top], label[top], score[top]
    candidates = boxes[anchor]
    keep = batched_nms(candidates, score, torch.zeros_like(label) if agnostic else label, iou_threshold)[:max_detections]
    return candidates[keep], score[keep], label[keep]


def reference_to_original(boxes: torch.Tensor, box: detection.Letterbox, span: Span | None = None) -> torch.Tensor:
    span = span or Span.whole((box.width, box.height))  # the photo's pixels, when it was decoded smaller (a JPEG draft)
    out_w, out_h = span.size
    x = ((boxes[:, [0, 2]] - box.pad_x) / box.scale_x * (span.width / box.width) - span.left).clamp(0, out_w)
    y = ((boxes[:, [1, 3]] - box.pad_y) / box.scale_y * (span.height / box.height) - span.top).clamp(0, out_h)
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
    """``train``: one dataset per source; ``epoch_images``: how many of each an epoch draws (None: all of
    each, shuffled); ``val_parts``: source name -> its images' indices in ``val``, for per-source metrics."""

    def __init__(
        self,
        args: argparse.Namespace,
        train: Dataset | list[Dataset],
        val: Cached,
        classes: list[str],
        mean: list[float],
        std: list[float],
        epoch_images: list[int] | None = None,
        val_parts: dict[str, range] | None = None,
    ):
        self.args, self.val, self.classes = args, val, classes
        self.sources = train if isinstance(train, list) else [train]
        self.train: Dataset = self.sources[0] if len(self.sources) == 1 else ConcatDataset(self.sources)
        self.epoch_images = epoch_images
        self.val_parts = val_parts or {}
        self.autocast = bf16_autocast(args.no_bf16)
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
        self.steps_per_epoch = max(1, self.epoch_size // args.batch_size)
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

    @property
    def epoch_size(self) -> int:
        return sum(self.epoch_images) if self.epoch_images else len(cast(Sized, self.train))

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        """One epoch's indices into ``self.train``: ``epoch_images[i]`` of source i (each photo at most
        once while it has enough, then again), all shuffled together."""
        assert self.epoch_images is not None
        picked, offset = [], 0
        for source, count in zip(self.sources, self.epoch_images, strict=True):
            size = len(cast(Sized, source))
            rounds = [torch.randperm(size, generator=generator) for _ in range(-(-count // size))] if size else []
            picked.append(torch.cat(rounds)[:count] + offset if rounds else torch.zeros(0, dtype=torch.long))
            offset += size
        order = torch.cat(picked)
        return order[torch.randperm(len(order), generator=generator)].tolist()

    def train_batches(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed * 1000 + epoch)
        order = self.epoch_order(generator) if self.epoch_images else None
        return DataLoader(
            self.train,
            batch_size=self.args.batch_size,
            shuffle=order is None,
            sampler=order,
            drop_last=self.epoch_size >= self.args.batch_size,
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
        aware: list[dict[str, torch.Tensor]] = []
        agnostic: list[dict[str, torch.Tensor]] = []
        for b, s, box in zip(boxes, scores, data.letterboxes, strict=True):
            for out, flag in ((aware, False), (agnostic, True)):
                kept, score, label = reference_select(
                    b, s, EVAL_SCORE_THRESHOLD, iou_threshold, MAX_DETECTIONS, flag, content=box
                )
                out.append(_as_prediction(reference_to_original(kept, box), score, label, flag))
        return aware, agnostic

    def evaluate(self) -> dict[str, float]:
        if not len(self.val):
            return {}
        aware, agnostic = self.detect(self.val, 0.5)
        targets = self.val.targets()
        metrics = detection_metrics(aware, agnostic, targets, self.classes)
        out = {key: metrics[key] for key in ("any_ap50", "map50", "map")}
        for name, part in self.val_parts.items():  # each source on its own, so one cannot hide another
            chosen = [(aware[i], agnostic[i], targets[i]) for i in part]
            if chosen:
                a, g, t = (list(column) for column in zip(*chosen, strict=True))
                out[f"{name}_any_ap50"] = detection_metrics(a, g, t, self.classes)["any_ap50"]
        return out

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


@dataclass
class Source:
    """One data folder's photos, split three ways. ``portraits``: one big centred face per photo (LFW)."""

    root: Path
    train: list[BoxedImage]
    val: list[BoxedImage]
    test: list[BoxedImage]
    split: str  # how the test photos were chosen, for the card
    portraits: bool = False
    pair_images: frozenset[Path] = frozenset()  # LFW: the test photos named in the DevTest pairs

    @property
    def name(self) -> str:
        return self.root.name


def is_lfw(root: Path) -> bool:
    return (root / "landmarks.txt").is_file() and (root / "pairs" / "pairsDevTest.txt").is_file()


def _limited(args: argparse.Namespace, train: list, val: list, test: list) -> tuple[list, list, list]:
    if not args.limit:
        return train, val, test
    return train[: args.limit], val[: max(2, args.limit // 4)], test[: max(2, args.limit // 4)]


def load_splits(
    args: argparse.Namespace, root: Path | None = None, split_file: Path | None = None
) -> tuple[list[BoxedImage], list[BoxedImage], list[BoxedImage], str]:
    """Train / validation (seeded part of train) / test samples of a box folder and a description of the split."""
    root = root or args.data_dir[0]
    samples = load_boxes(root)
    by_key = {s.key: s for s in samples}
    split_path = split_file or SPLITS / f"{root.name}.json"
    if split_path.is_file():
        split = read_split(split_path)
        missing = [k for k in split["train"] + split["test"] if k not in by_key]
        if missing:
            raise ValueError(f"{split_path} lists {len(missing)} images not in {root}, e.g. {missing[:3]}")
        described = f"{split_path.name} ({len(split['test'])} test images)"
        if unlisted := sorted(set(by_key) - set(split["train"]) - set(split["test"])):  # (left out without a word)
            print(f"warning: {len(unlisted)} photos of {root} are not in {split_path} and are left out, e.g. {unlisted[:3]}")
    else:
        split = make_split(sorted(by_key), args.split_seed, args.test_fraction)
        name = "split.json" if len(args.data_dir) == 1 else f"split-{root.name}.json"
        write_split(args.runs_dir / args.name / name, split, seed=args.split_seed, test_fraction=args.test_fraction)
        described = f"seeded {args.test_fraction:.0%} of images (--split-seed {args.split_seed})"
    train_keys = list(split["train"])
    np.random.default_rng(args.split_seed).shuffle(train_keys)
    held = round(len(train_keys) * args.val_fraction)
    val_keys, train_keys = sorted(train_keys[:held]), sorted(train_keys[held:])
    train_keys, val_keys, test_keys = _limited(args, train_keys, val_keys, split["test"])
    if args.limit:
        described += f", the first {len(test_keys)} of them (--limit)"
    pick = lambda keys: [by_key[k] for k in keys]  # noqa: E731
    return pick(train_keys), pick(val_keys), pick(test_keys), described


def lfw_source(args: argparse.Namespace, root: Path) -> Source:
    """LFW with one landmark box per photo. Test: every photo of the people in ``pairsDevTest.txt``
    (never trained on). Validation: whole people drawn in a seeded order from the others, up to
    ``--val-fraction`` of their photos (at most :data:`LFW_VAL_IMAGES`); training: the rest."""
    devtest = pair_people(root / "pairs" / "pairsDevTest.txt")
    person = lambda sample: sample.path.parent.name  # noqa: E731
    every = boxed_faces(root)
    test = [s for s in every if person(s) in devtest]
    allowed = [s for s in every if person(s) not in devtest]
    counts = Counter(person(s) for s in allowed)
    people = sorted(counts)
    np.random.default_rng(args.split_seed).shuffle(people)
    budget = min(LFW_VAL_IMAGES, round(len(allowed) * args.val_fraction))
    held: set[str] = set()
    for name in people:  # whole people, never more photos than the budget left
        if counts[name] <= budget:
            held.add(name)
            budget -= counts[name]
    train = [s for s in allowed if person(s) not in held]
    val = [s for s in allowed if person(s) in held]
    pairs = read_pairs(root / "pairs" / "pairsDevTest.txt")
    pair_images = frozenset(root / "images" / path for pair in pairs for path in (pair.a, pair.b))
    train, val, test = _limited(args, train, val, test)
    split = f"{len(test)} photos of the {len(devtest)} pairsDevTest.txt people" + (" (--limit)" if args.limit else ", all")
    return Source(root, train, val, test, split, portraits=True, pair_images=pair_images)


def load_sources(args: argparse.Namespace) -> list[Source]:
    """Every ``--data-dir`` as a :class:`Source`; with ``--merge-labels`` every box gets that one name."""
    sources = []
    for index, root in enumerate(args.data_dir):
        if is_lfw(root):
            sources.append(lfw_source(args, root))
        else:
            train, val, test, split = load_splits(args, root, args.split if index == 0 else None)
            sources.append(Source(root, train, val, test, split))
    if args.merge_labels:
        merge = lambda samples: [replace(s, names=[args.merge_labels] * len(s.names)) for s in samples]  # noqa: E731
        sources = [replace(s, train=merge(s.train), val=merge(s.val), test=merge(s.test)) for s in sources]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"two data folders share a name: {names}")
    return sources


def check_photos(folder: Path) -> list[Path]:
    """Every photo under ``folder`` (recursively, sorted): a ``--check-dir``."""
    found = sorted(p for p in folder.rglob("*") if is_photo(p, folder) and p.is_file())
    if not found:
        raise FileNotFoundError(f"{folder}: no photos")
    return found


def upload_bytes(path: Path) -> bytes:
    """The file as a client would upload it: as it is, or (Netpbm, e.g. AT&T's .pgm, which the service
    does not read) re-encoded losslessly as PNG."""
    if path.suffix.lower() not in (".pgm", ".ppm", ".pbm", ".pnm"):
        return path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _served(session: OnnxModel, manifest: Manifest, paths: list[Path]) -> Iterator[tuple[Any, ...]]:
    """The service's pipeline on files: decode (EXIF, and the JPEG draft a large photo gets) -> letterbox -> ORT
    -> raw outputs, the letterbox and the photo pixels the decoded image spans, which boxes map back to (one photo at
    a time: thousands of float canvases would not fit in memory)."""
    for path in paths:
        decoded = decode_for_graph(upload_bytes(path), MAX_PIXELS, manifest.input.color, manifest.input.size, False)
        inputs, box = detection.preprocess(decoded.image, manifest)
        boxes, scores = session.run(inputs)
        yield inputs, boxes[0], scores[0], box, decoded.span


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


def measure_latency(
    onnx_path: Path, manifest: Manifest, photo: Path, threads: int, repeats: int = 30, long_side: int | None = 640
) -> dict[str, Any]:
    """Median ms for one JPEG (``photo`` scaled to a ``long_side``-px longer side, or as it is) through
    decode + letterbox + graph + NMS, and for the graph alone, with ONNX Runtime on ``threads``
    threads and the service's session options."""
    session = OnnxModel(onnx_path, manifest.input.name, list(manifest.outputs.values()), threads=threads)
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
        if long_side:
            scale = long_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    data = buffer.getvalue()
    defaults = manifest.defaults

    def pipeline() -> None:
        decoded = decode_for_graph(data, MAX_PIXELS, "RGB", manifest.input.size, keep_photo=False)
        inputs, box = detection.preprocess(decoded.image, manifest)
        boxes, scores = session.run(inputs)
        kept, _, _ = detection.select(
            boxes[0], scores[0], defaults["score_threshold"], defaults["iou_threshold"], defaults["max_detections"]
        )
        detection.to_original(kept, box, decoded.span)

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
        f"latency_{long_side}px_ms" if long_side else "latency_ms": round(statistics.median(timings["pipeline"]) * 1000, 2),
        "latency_graph_ms": round(statistics.median(timings["graph"]) * 1000, 2),
        "latency_image": f"{image.width}x{image.height} JPEG",
    }


class ParityTally:
    """Served detections vs the PyTorch reference post-processing, over every photo compared."""

    def __init__(self) -> None:
        self.compared = self.unmatched = 0
        self.worst_px = self.worst_score = 0.0

    def add(self, counts: tuple[int, float, float, int]) -> None:
        n, px, score, unmatched = counts
        self.compared, self.unmatched = self.compared + n, self.unmatched + unmatched
        self.worst_px, self.worst_score = max(self.worst_px, px), max(self.worst_score, score)

    def check(self) -> None:
        if self.unmatched or self.worst_px > BOX_TOLERANCE_PX or self.worst_score > SCORE_TOLERANCE:
            raise ParityError(
                f"served detections differ from the PyTorch reference: {self.unmatched} unmatched, "
                f"{self.worst_px:.3g} px, {self.worst_score:.3g}"
            )


def serve_photos(
    session: OnnxModel, parity: OrtParity, tally: ParityTally, manifest: Manifest, paths: list[Path], threshold: float
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], list[np.ndarray]]:
    """The served pipeline on ``paths``, each photo checked against PyTorch (graph and post-processing).

    Returns class-aware and agnostic detections down to the AP score threshold, and the boxes the
    service returns by default (``threshold``), all in original pixels."""
    aware: list[dict[str, torch.Tensor]] = []
    agnostic: list[dict[str, torch.Tensor]] = []
    found: list[np.ndarray] = []
    for inputs, boxes, scores, box, span in _served(session, manifest, paths):
        (torch_boxes, torch_scores), _ = parity.run(torch.from_numpy(inputs))
        kept, score, label = detection.select(boxes, scores, threshold, 0.5, MAX_DETECTIONS, content=box)
        reference = reference_select(
            torch.from_numpy(torch_boxes[0]), torch.from_numpy(torch_scores[0]), threshold, 0.5, MAX_DETECTIONS, content=box
        )
        found.append(detection.to_original(kept, box, span))
        tally.add(
            _compare(
                (found[-1], score, label),
                (reference_to_original(reference[0], box, span), reference[1], reference[2]),
            )
        )
        for out, flag in ((aware, False), (agnostic, True)):
            k, s, lab = detection.select(boxes, scores, EVAL_SCORE_THRESHOLD, 0.5, MAX_DETECTIONS, agnostic=flag, content=box)
            out.append(_as_prediction(detection.to_original(k, box, span), s, lab, flag))
    return aware, agnostic, found


def found_at_default(found: list[np.ndarray], samples: list[BoxedImage]) -> dict[str, float]:
    """At the serving defaults: the share of objects hit (a detection with IoU >= 0.5), of photos
    with any detection, and the detections per photo that hit no labelled object."""
    hits = objects = stray = photos_with_any = 0
    for boxes, sample in zip(found, samples, strict=True):
        overlap = (
            box_iou(torch.from_numpy(sample.boxes), torch.from_numpy(boxes)).numpy()
            if len(boxes)
            else np.zeros((len(sample.boxes), 0))
        )
        hits += int((overlap >= 0.5).any(1).sum()) if overlap.size else 0
        stray += int((~(overlap >= 0.5).any(0)).sum()) if len(boxes) else 0
        objects += len(sample.boxes)
        photos_with_any += bool(len(boxes))
    return {
        "detection_rate": round(hits / max(objects, 1), 4),
        "missed": objects - hits,
        "photos_with_detection": round(photos_with_any / max(len(samples), 1), 4),
        "unmatched_per_photo": round(stray / max(len(samples), 1), 4),
    }


def source_report(
    source: Source,
    classes: list[str],
    aware: list[dict[str, torch.Tensor]],
    agnostic: list[dict[str, torch.Tensor]],
    found: list[np.ndarray],
) -> dict[str, Any]:
    """A further source's test split: AP (any object) and what the service finds at its defaults."""
    targets = [
        {"boxes": torch.from_numpy(s.boxes).float(), "labels": torch.tensor([classes.index(n) for n in s.names])}
        for s in source.test
    ]
    ap = detection_metrics(aware, agnostic, targets, classes)
    report: dict[str, Any] = {
        "split": source.split,
        "images": len(source.test),
        "objects": sum(len(s.boxes) for s in source.test),
        "any_ap50": round(ap["any_ap50"], 4),
        "any_ap": round(ap["any_ap"], 4),
        **found_at_default(found, source.test),
    }
    chosen = [i for i, s in enumerate(source.test) if s.path in source.pair_images]
    if chosen:
        pick = lambda items: [items[i] for i in chosen]  # noqa: E731
        pairs = found_at_default(pick(found), pick(source.test))
        report.update(
            {"pair_images": len(chosen), "pair_detection_rate": pairs["detection_rate"], "pair_missed": pairs["missed"]}
        )
    return report


def check_report(found: list[np.ndarray], photos: list[Path]) -> dict[str, Any]:
    """A ``--check-dir``: photos of one object each, without boxes: how many get one detection, or any."""
    counts = np.array([len(boxes) for boxes in found])
    return {
        "photos": len(photos),
        "found": round(float((counts > 0).mean()), 4),
        "missed": int((counts == 0).sum()),
        "exactly_one": round(float((counts == 1).mean()), 4),
        "photo_size": "x".join(str(v) for v in Image.open(photos[0]).size),
    }


def export(
    recipe: DetectorRecipe,
    args: argparse.Namespace,
    fitted: FitResult,
    sources: list[Source],
    mean: list[float],
    std: list[float],
    copies: list[Path] | None = None,
) -> dict[str, Any]:
    """Export the EMA model, check it against PyTorch, evaluate the served pipeline on every test split
    (the first source's gives the headline numbers, also without its ``copies`` of training photos) and
    every ``--check-dir``."""
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    size = args.image_size
    served_model = copy.deepcopy(recipe.ema.model).eval().float().to(memory_format=torch.contiguous_format)
    export_onnx(served_model, torch.zeros(2, 3, size, size), onnx_path, output_names=["boxes", "scores"])

    # Validation (never test) picks the serving score threshold: the best F1 of what /v1/detect
    # returns by default (class-aware detections), counting an object as found whatever its label.
    # In float32, as the served graph runs: bf16 scores would place the threshold a little off.
    recipe.autocast = False
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

    # Parity: the graph under ORT vs PyTorch on every test photo (raw outputs), then the service's
    # numpy post-processing vs the torchvision reference on the same outputs, at serving defaults.
    parity = OrtParity(served_model, onnx_path, GRAPH_TOLERANCE)
    tally = ParityTally()
    session = OnnxModel(onnx_path, "input", ["boxes", "scores"], threads=torch.get_num_threads())
    first, *others = sources
    test = first.test
    aware, agnostic, found = serve_photos(session, parity, tally, manifest, [s.path for s in test], threshold)
    further = {
        source.name: source_report(
            source, recipe.classes, *serve_photos(session, parity, tally, manifest, [s.path for s in source.test], threshold)
        )
        for source in others
        if source.test
    }
    checks = {}
    for folder in args.check_dir:
        photos = check_photos(folder)
        checks[folder.name] = check_report(serve_photos(session, parity, tally, manifest, photos, threshold)[2], photos)
    parity.check()
    tally.check()

    targets = [
        {"boxes": torch.from_numpy(s.boxes).float(), "labels": torch.tensor([recipe.classes.index(n) for n in s.names])}
        for s in test
    ]
    test_metrics = detection_metrics(aware, agnostic, targets, recipe.classes)
    metrics: dict[str, Any] = {
        "dataset": first.name,
        "split": first.split,
        "images": len(test),
        "objects": sum(len(s.boxes) for s in test),
        **{k: round(v, 4) for k, v in test_metrics.items()},
        "val_images": len(recipe.val),
        **{f"val_{k}": round(v, 4) for k, v in val_metrics.items() if k in ("any_ap50", "map50", "map")},
        "val_best_f1": round(val_f1, 4),
        "parity_max_abs_graph_diff": parity.max_abs_diff,
        "parity_detections": tally.compared,
        "parity_max_box_px": tally.worst_px,
        "parity_max_score_diff": tally.worst_score,
        "recall_at_default": recall_by_size(found, test),
    }
    if others or checks:
        metrics["detection_rate_at_default"] = found_at_default(found, test)["detection_rate"]
    if copies:
        copied = set(copies)
        unseen = [i for i, sample in enumerate(test) if sample.path not in copied]
        pick = lambda items: [items[i] for i in unseen]  # noqa: E731
        without = detection_metrics(pick(aware), pick(agnostic), pick(targets), recipe.classes)
        metrics["test_copies_of_training"] = sorted(path.name for path in copies)
        metrics["without_copies"] = {
            "images": len(unseen),
            **{k: round(without[k], 4) for k in ("any_ap50", "any_ap", "map50", "map")},
        }
    # The service runs ONNX Runtime on every core by default; one thread is the busy-machine case.
    cores = Settings(_env_file=None).intra_op_threads
    metrics.update(measure_latency(onnx_path, manifest, test[0].path, cores))
    metrics["latency_threads"] = cores
    single = measure_latency(onnx_path, manifest, test[0].path, 1)
    metrics["latency_640px_ms_1thread"] = single["latency_640px_ms"]
    metrics["latency_graph_ms_1thread"] = single["latency_graph_ms"]
    # Further sources and check folders: one of their photos as it is (their own size).
    examples = {name: next(s.path for s in src.test) for name, src in ((s.name, s) for s in others if s.test)}
    examples.update({folder.name: check_photos(folder)[0] for folder in args.check_dir})
    for name, report in {**further, **checks}.items():
        timing = measure_latency(onnx_path, manifest, examples[name], cores, long_side=None)
        report.update(
            {
                "latency_ms": timing["latency_ms"],
                "latency_graph_ms": timing["latency_graph_ms"],
                "latency_image": timing["latency_image"],
            }
        )
        metrics[name] = report
    manifest.metrics = metrics
    record_args = argparse.Namespace(**{**vars(args), "data_dir": " + ".join(str(d) for d in args.data_dir)})
    manifest.training = fit_record(
        record_args,
        fitted,
        train_images=len(cast(Sized, recipe.train)),
        val_images=len(recipe.val),
    )
    if len(sources) > 1:
        manifest.training["sources"] = {
            s.name: {"train_images": len(s.train), "val_images": len(s.val), "test_images": len(s.test)} for s in sources
        }
        if recipe.epoch_images:
            manifest.training["epoch_images"] = dict(zip([s.name for s in sources], recipe.epoch_images, strict=True))
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
    others, data_lines, limits = further_sections(args, manifest)
    return f"""# {manifest.name}

One-stage object detector ({len(manifest.labels)} classes: {", ".join(manifest.labels)}), trained from scratch.

## Result (held-out test split, ONNX Runtime + the service's post-processing)
{m["images"]} test images with {m["objects"]} objects ({m["split"]} of `{m["dataset"]}`):

- class-agnostic ("any object") AP@0.5: **{m["any_ap50"]:.4f}**, AP@[.5:.95]: {m["any_ap"]:.4f}
- {len(manifest.labels)}-class mAP@0.5: **{m["map50"]:.4f}**, COCO mAP@[.5:.95]: {m["map"]:.4f}{copies_sentence(m)}

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
{others}

{metrics_table(m)}

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
  and the exported weights are the EMA after the last epoch.{data_lines}
- {args.epochs} epochs, batch {args.batch_size}, {args.crop}-px crops, AdamW (lr {args.lr}, weight decay
  {args.weight_decay}), {args.warmup_epochs:g}-epoch warm-up then cosine, EMA {args.ema_decay}; flip, scale jitter
  {list(args.scale_jitter)}, colour jitter; bf16 autocast: {bf16_autocast(args.no_bf16)}.
- wall time (training only): {t["seconds"]:.0f} s on {t["threads"]} CPU thread(s) ({t["machine"]}); seed {t["seed"]}.
- command: `{t["command"]}`, commit `{t["commit"]}` (with `--resume`, a finished run is only
  re-exported from its last checkpoint; without a checkpoint the same command trains from scratch).

## Limits
- Small objects are missed most: recall at the default threshold (IoU >= 0.5, labels ignored) on the
  test split by object size (sqrt of the box area, original pixels); the finest grid has stride 8.

| size | share of objects | recall |
| --- | --- | --- |
{size_rows}

{limits}

![curves](curves.png)
"""


def copies_sentence(metrics: dict[str, Any]) -> str:
    if "without_copies" not in metrics:
        return ""
    copies, without = metrics["test_copies_of_training"], metrics["without_copies"]
    return (
        f"\n- {copies_note(copies)} On the other {without['images']}: any-object AP@0.5 "
        f"{without['any_ap50']:.4f}, mAP@0.5 {without['map50']:.4f}, COCO mAP {without['map']:.4f}."
    )


def further_sections(args: argparse.Namespace, manifest: Manifest) -> tuple[str, str, str]:
    """The card's text for a multi-source run (further test splits, check folders, the data mix) and its limits."""
    m, t = manifest.metrics, manifest.training
    threshold = manifest.defaults["score_threshold"]
    if m.get("dataset") == "facemask" and "mask_weared_incorrect" in manifest.labels:  # counts of that data set
        limits = (
            "- `mask_weared_incorrect` has 123 examples in the whole data set (about 100 for training), so its AP\n"
            f"  is the least certain number here; the validation split ({m['val_images']} images) is small and its AP is noisy."
        )
    else:
        limits = f"- The validation split ({m['val_images']} images) picks the threshold; its AP is noisy."
    sources = t.get("sources")
    if not sources:
        return "", "", limits
    rows = []
    for name, report in m.items():
        if not isinstance(report, dict) or "latency_ms" not in report:
            continue
        timing = f"{report['latency_ms']} ms per {report['latency_image']} photo (graph {report['latency_graph_ms']} ms)"
        if "photos" in report:
            rows.append(
                f"- `{name}` ({report['photos']} photos of {report['photo_size']} px, one face each, never trained on): "
                f"a face found in **{report['found']:.2%}** of them ({report['missed']} missed), exactly one in "
                f"{report['exactly_one']:.2%}; {timing}."
            )
            continue
        pairs = (
            f"; on the {report['pair_images']} photos named in the pairs file: **{report['pair_detection_rate']:.2%}** "
            f"({report['pair_missed']} missed)"
            if "pair_images" in report
            else ""
        )
        rows.append(
            f"- `{name}` test ({report['split']}, never trained on): **{report['detection_rate']:.2%}** of "
            f"{report['objects']} faces hit ({report['missed']} missed){pairs}; any-face AP@0.5 {report['any_ap50']:.4f}, "
            f"AP@[.5:.95] {report['any_ap']:.4f}; detections hitting no labelled face: {report['unmatched_per_photo']:.3f} "
            f"per photo; {timing}."
        )
    others = (
        f"\n## Other photos (the serving default threshold {threshold})\n"
        "A hit is a detection with IoU >= 0.5 to the labelled box (for LFW the square landmark box, brows to chin).\n"
        f"On `{m['dataset']}`'s test split {m['detection_rate_at_default']:.2%} of the faces are hit.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    mix = ", ".join(
        f"`{name}` {c['train_images']} train / {c['val_images']} val / {c['test_images']} test"
        + (f" ({t['epoch_images'][name]} drawn per epoch)" if t.get("epoch_images") else "")
        for name, c in sources.items()
    )
    merged = f"; labels merged into `{args.merge_labels}`" if args.merge_labels else ""
    data_lines = f"\n- sources: {mix}{merged}"
    data_lines += any(is_lfw(root) for root in args.data_dir) * (
        f"\n- LFW photos are re-framed on the fly: the face's longer side drawn log-uniformly from "
        f"{args.portrait_sizes[0]:g} to {args.portrait_sizes[1]:g} px of the {args.crop}-px crop, placed anywhere (cut by the "
        f"crop's edges when larger), mean-colour canvas around the photo; {args.grayscale:.0%} of all crops turned gray."
    )
    limits += (
        "\n- LFW's boxes come from 5 landmarks (a square from brows to chin), facemask's were drawn by hand: the two"
        "\n  sources disagree a little on where a face box ends, which costs AP at high IoU more than at 0.5."
        "\n- LFW photos often show other people at their edges; those faces are not labelled, so finding them"
        "\n  counts as unmatched above and was penalised as background in training."
    )
    return others, data_lines, limits


def untrained_classes(sources: list[Source], classes: list[str]) -> list[str]:
    """The classes with boxes in held-out photos only (a label typo, or a split that put all of a rare class aside)."""
    trained = set(class_names([sample for source in sources for sample in source.train]))
    return [name for name in classes if name not in trained]


def main(args: argparse.Namespace) -> None:
    for option, side in (("--image-size", args.image_size), ("--crop", args.crop)):
        if side % 32:  # the FPN joins stride-32 maps to stride-16 ones: else the first evaluation fails, epochs in
            raise SystemExit(f"{option} {side}: a multiple of 32, the network's coarsest stride")
    start_run(args.seed, args.threads)
    args.data_dir = args.data_dir or [DEFAULT_DATA]
    sources = load_sources(args)
    if args.epoch_images is not None and len(args.epoch_images) != len(sources):
        raise SystemExit(f"--epoch-images: one number per --data-dir ({len(sources)})")
    everything = [s for source in sources for s in source.train + source.val + source.test]
    classes = class_names(everything)
    if not classes:
        raise SystemExit(f"no annotated object in {', '.join(map(str, args.data_dir))}: a detector needs boxes to learn from")
    if unseen := untrained_classes(sources, classes):  # outputs nothing taught (own-data hunt): silently AP 0 in the mAP
        print(f"warning: no training photo has a box of {unseen}: the model cannot learn them (their AP counts as 0)")
    # The canvas statistics of what the service letterboxes: box sources' photos (LFW's only when alone).
    boxed = [s for source in sources if not source.portraits for s in source.train] or sources[0].train
    mean, std = channel_stats(boxed)
    # The headline test split's photos that copy training ones (LFW's test split is other people).
    first = sources[0]
    copies = (
        [] if first.portraits else copies_of_training([s.path for s in first.test], [s.path for s in first.train + first.val])
    )
    if copies:
        print(copies_warning([path.name for path in copies], len(first.test), f"{first.name} test"))
    started = time.perf_counter()
    fill = detection.fill_color(mean)
    train_sets: list[Dataset] = []
    for source in sources:
        if source.portraits:
            train_sets.append(Portraits(source.train, classes, args.crop, tuple(args.portrait_sizes), fill, args.grayscale))
        else:
            cached = Cached(source.train, classes, args.image_size, mean)
            train_sets.append(Augmented(cached, args.crop, tuple(args.scale_jitter), fill, args.grayscale))
    val = Cached([s for source in sources for s in source.val], classes, args.image_size, mean)
    parts, offset = {}, 0
    for source in sources:
        parts[source.name] = range(offset, offset + len(source.val))
        offset += len(source.val)
    described = "; ".join(
        f"{s.name}: {len(s.train)} training / {len(s.val)} validation / {len(s.test)} test ({s.split})" for s in sources
    )
    print(f"{described}; classes {classes}; cached in {time.perf_counter() - started:.1f} s")
    recipe = DetectorRecipe(args, train_sets, val, classes, mean, std, args.epoch_images, parts if len(sources) > 1 else None)
    result = fit(
        recipe,
        args.epochs,
        args.runs_dir / args.name,
        resume=args.resume,
        eval_every=args.eval_every,
        stop_after=args.stop_after,
        options=vars(args),
    )
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    metrics = export(recipe, args, result, sources, mean, std, copies)
    print(
        f"exported {args.models_dir / args.name}: any-object AP@0.5 {metrics['any_ap50']:.4f}, mAP@0.5 {metrics['map50']:.4f}, "
        f"COCO mAP {metrics['map']:.4f}; {metrics['latency_640px_ms']} ms per 640-px image; {result.seconds:.0f} s training"
    )
    for name, report in metrics.items():
        if isinstance(report, dict) and "latency_ms" in report:
            print(f"{name}: {json.dumps(report)}")
