"""Face-embedding recipe: a small CNN distilled from a teacher and trained with a metric loss on LFW.

    python -m training face --data-dir ../shared/datasets/lfw --name lfw-face

Data. Only people absent from ``pairs/pairsDevTest.txt`` are used. Of them, a seeded
``--val-people`` (people with 2..20 photos) are held out entirely: their photos measure the model
after every epoch and calibrate the served decision threshold. Everyone else trains.

Crops are the service's (``service.tasks.faces.crop_face``): a square ``1 + 2 * margin`` times
the face box, resized to 112x112. Training boxes come from the LFW landmarks
(``training.datasets.lfw.landmark_box``, the boxes the face detector is trained to predict),
shifted and scaled by a few percent so that a detector's noise does not matter; plus mirror,
colour jitter and grayscale (AT&T is grayscale).

Loss. ``--distill-weight`` x cosine distance to a teacher's embedding of the same photo (dlib's
ResNet, cached once by ``training/face_teacher.py``, centred on the training photos' mean; no
identity labels needed, so every training photo counts) + ``--metric-weight`` x a metric-learning loss on the identities:
ArcFace (default; people with at least 2 training photos are its classes), batch-hard triplet
or contrastive. Batches hold photos of the same person in pairs so the pair losses always see
positives. AdamW, warm-up + cosine, bf16 autocast and channels-last on the CPU.

Export. ONNX with dynamic batch and the L2-normalisation inside the graph, checked against
PyTorch on real crops. Everything after that runs the exported graph with the service's
pre-processing: the threshold is calibrated on the held-out people's pairs (never DevTest), at the
best balanced accuracy or (``--threshold-rule far``) at ``--far``; then LFW View 1 DevTest (1,000
pairs, people unseen in training): accuracy at that threshold, ROC AUC, TAR at FAR = 1e-2; and AT&T
one-shot identification (enroll one photo per person, identify the other nine; rank-1). When
``--detector`` (default ``models/face-detector``) exists, crops are cut around its largest face
exactly as the service does and missed faces count as errors; landmark-box (LFW) and whole-photo
(AT&T) crops are reported beside them.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from service.images import decode_image, normalise, to_array
from service.manifest import InputSpec, Manifest, Task
from service.runtime import OnnxModel
from service.settings import DEFAULT_MODELS
from service.tasks import detection
from service.tasks.faces import DEFAULT_MARGIN, crop_face, faces_from_outputs
from training import face_teacher
from training.datasets import MAX_PIXELS, ChannelStatistics, lfw
from training.engine import FitResult, bf16_autocast, fit, start_run, warmup_cosine
from training.export import OrtParity, ParityError, export_onnx, fit_record, metrics_table, provenance, write_model_folder
from training.losses import ArcFace, batch_hard_triplet, contrastive, distillation
from training.nets.face import FaceNet, Normalised

SIZE = (112, 112)
STATISTICS_PHOTOS = 1000  # training photos the input mean/std are measured on
EMBEDDING_TOLERANCE = 1e-3  # max |ORT - PyTorch| per component of a unit embedding
COSINE_TOLERANCE = 1e-4  # 1 - cos(ORT, PyTorch) per face


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/lfw"))
    parser.add_argument("--att-dir", type=Path, default=Path("../shared/datasets/att_faces"), help="one-shot check")
    parser.add_argument("--name", default="lfw-face")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="the model repository the service reads")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="checkpoints and logs")
    parser.add_argument(
        "--detector",
        default=str(DEFAULT_MODELS / "face-detector"),
        help="face detector model folder for evaluation ('none': boxes only)",
    )
    parser.add_argument(
        "--teacher-cache", type=Path, default=None, help="the teacher's embeddings (default: <runs-dir>/face-teacher/teacher.npz)"
    )
    parser.add_argument("--distill-weight", type=float, default=1.0, help="0: no teacher")
    parser.add_argument("--metric-loss", choices=["arcface", "triplet", "contrastive", "none"], default="arcface")
    parser.add_argument(
        "--metric-weight", type=float, default=0.05, help="small: ArcFace's gradient (scale 32) dwarfs the distillation's"
    )
    parser.add_argument("--arcface-scale", type=float, default=32.0)
    parser.add_argument("--arcface-margin", type=float, default=0.5)
    parser.add_argument("--triplet-margin", type=float, default=0.3)
    parser.add_argument("--contrastive-margin", type=float, default=1.0)
    parser.add_argument("--dim", type=int, default=128, help="embedding size (the teacher's is 128)")
    parser.add_argument("--widths", type=int, nargs="+", default=(64, 128, 192), help="the reference lfw-face's")
    parser.add_argument("--depths", type=int, nargs="+", default=(2, 3, 2))
    parser.add_argument("--stem", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="crop margin around the face box")
    parser.add_argument("--box-shift", type=float, default=0.06, help="box jitter: shift, fraction of the box side")
    parser.add_argument("--box-scale", type=float, default=0.08, help="box jitter: relative size change")
    parser.add_argument("--epochs", type=int, default=120, help="120 (the reference): 5,500 s on 2 AVX-512 cores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--val-people", type=int, default=200, help="held-out training-side people (validation, threshold)")
    parser.add_argument(
        "--threshold-rule",
        choices=["balanced", "far"],
        default="balanced",
        help="served threshold: best balanced accuracy on the held-out pairs, or the one at --far",
    )
    parser.add_argument("--far", type=float, default=1e-2, help="false-accept rate for --threshold-rule far")
    parser.add_argument("--no-flip-tta", action="store_true", help="export without mirror-averaged embeddings")
    parser.add_argument("--limit", type=int, default=None, help="first N training people (smoke runs)")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="smoke runs: N DevTest pairs and max(2, N // 10) AT&T people"
    )
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes (0: augment in the training process)")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint (or re-export)")
    parser.add_argument("--stop-after", type=int, default=None, help="end after epoch N of the schedule (resume later)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (the default where the CPU has no bf16 kernels)")


# ---------------------------------------------------------------------------------------------
# Verification and identification metrics (numpy; scores are cosine similarities)


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Probability that a random matched pair scores above a random mismatched one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives, negatives = int(same.sum()), int((~same).sum())
    return float((ranks[same].sum() - positives * (positives + 1) / 2) / max(positives * negatives, 1))


def threshold_at_far(negative_scores: np.ndarray, far: float) -> float:
    """The lowest threshold (match when ``score >= threshold``) accepting at most ``far`` of the negatives."""
    ordered = np.sort(negative_scores)[::-1]
    allowed = math.floor(far * len(ordered))
    if allowed >= len(ordered):
        return float(ordered[-1])
    return float(np.nextafter(np.float32(ordered[allowed]), np.float32(np.inf)))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    return float((scores[same] >= threshold_at_far(scores[~same], far)).mean())


def balanced_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising (TAR + TNR) / 2: the best accuracy on pairs half matched, half not (as DevTest)."""
    order = np.argsort(-scores, kind="stable")
    ordered, truth = scores[order], same[order]
    tar = np.cumsum(truth) / max(int(truth.sum()), 1)  # accepting the first k + 1 pairs
    far = np.cumsum(~truth) / max(int((~truth).sum()), 1)
    last_of_ties = np.r_[ordered[1:] != ordered[:-1], True]  # a threshold accepts all pairs of equal score
    best = int(np.argmax(np.where(last_of_ties, tar - far, -np.inf)))
    return float(ordered[best])


def best_accuracy(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The best accuracy over all thresholds and that threshold (an oracle: it looks at the labels)."""
    candidates = np.unique(scores)
    accuracies = [float(((scores >= t) == same).mean()) for t in candidates]
    best = int(np.argmax(accuracies))
    return accuracies[best], float(candidates[best])


def one_shot_rank1(embeddings: list[list[np.ndarray | None]], enrolled: int) -> float:
    """People x photos embeddings (None: no face found). Enroll photo ``enrolled`` of each person,
    identify every other photo by its nearest enrolled face; a photo without a face is an error."""
    gallery = [(person, vector) for person, photos in enumerate(embeddings) if (vector := photos[enrolled]) is not None]
    names = np.asarray([person for person, _ in gallery])
    matrix = np.stack([vector for _, vector in gallery])
    correct = total = 0
    for person, photos in enumerate(embeddings):
        for index, vector in enumerate(photos):
            if index == enrolled:
                continue
            total += 1
            if vector is not None and names[int(np.argmax(matrix @ vector))] == person:
                correct += 1
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class FacePhoto:
    key: str  # LFW: the path relative to images/ (the teacher cache's key); AT&T: "s1/1.pgm"
    path: Path
    box: tuple[float, float, float, float] | None  # the landmark face box; None = unknown


def as_box(values: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def lfw_photos(root: Path, rels: list[str], marks: dict[str, np.ndarray]) -> list[FacePhoto]:
    # LFW photos are all 160x160: boxes are clipped to the photo as the detector's targets are.
    return [FacePhoto(rel, root / "images" / rel, as_box(np.clip(lfw.landmark_box(marks[rel]), 0, 160))) for rel in rels]


def att_photos(root: Path, people: int | None) -> list[list[FacePhoto]]:
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("s")), key=lambda p: int(p.name[1:]))
    return [[FacePhoto(f"{folder.name}/{i}.pgm", folder / f"{i}.pgm", None) for i in range(1, 11)] for folder in folders[:people]]


@dataclass
class Split:
    train: list[FacePhoto]
    person: np.ndarray  # [N] person index (every training person)
    arc_class: np.ndarray  # [N] ArcFace class (people with >= 2 training photos) or -1
    val: list[FacePhoto]
    val_people: list[str]
    excluded_people: int  # DevTest people
    excluded_photos: int


def make_split(args: argparse.Namespace) -> Split:
    if not args.att_dir.is_dir():  # read by the export's one-shot check: found missing after the whole training
        raise SystemExit(f"--att-dir {args.att_dir}: no such folder (AT&T faces, one sub-folder per person)")
    marks = lfw.read_landmarks(args.data_dir)
    devtest = lfw.pair_people(args.data_dir / "pairs" / "pairsDevTest.txt")
    people = lfw.images_by_person([rel for rel in marks if rel.split("/")[0] not in devtest])
    val_people = lfw.held_out_people(people, args.val_people, args.seed)
    train_people = [p for p in sorted(people) if p not in val_people][: args.limit]
    rels = [rel for p in train_people for rel in people[p]]
    if len(rels) < 2:  # a batch of one photo: batch-norm has no batch statistics, and no pair to learn from
        raise SystemExit(f"--limit {args.limit}: {len(rels)} training photo(s); training needs at least 2 (raise --limit)")
    lookup = {p: i for i, p in enumerate(train_people)}
    person = np.asarray([lookup[rel.split("/")[0]] for rel in rels])
    counts = np.bincount(person)
    multi = {int(p): c for c, p in enumerate(np.flatnonzero(counts >= 2))}
    metric = args.metric_loss != "none" and args.metric_weight > 0
    if metric and len(multi) < 2:  # every pair or class of the metric loss needs them: it trained on nothing (loss 0)
        raise SystemExit(
            f"{len(multi)} training people have two or more photos ({len(val_people)} people held out for validation, "
            "--val-people): the metric loss needs at least 2; lower --val-people, raise --limit or add people"
        )
    arc_class = np.asarray([multi.get(int(p), -1) for p in person])
    val_rels = [rel for p in sorted(val_people) for rel in people[p]]
    return Split(
        lfw_photos(args.data_dir, rels, marks),
        person,
        arc_class,
        lfw_photos(args.data_dir, val_rels, marks),
        sorted(val_people),
        len(devtest),
        sum(1 for rel in marks if rel.split("/")[0] in devtest),
    )


def teacher_targets(args: argparse.Namespace, photos: list[FacePhoto]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The teacher's raw embeddings ``[N, 128]`` of the photos and of their mirror images (the plain one where
    the cache holds no mirror), extracting whatever the cache lacks; how many mirrors were cached and in how
    many photos dlib's HOG detector found the face (else the landmark box was the teacher's face rectangle)."""
    keys = [p.key for p in photos]
    cache = face_teacher.load(args.teacher_cache)
    cached = set(cache.get("paths", np.asarray([], str)).tolist())
    if any(k not in cached for k in keys):
        missing = [k for k in keys if k not in cached]
        print(f"teacher: embedding {len(missing)} photos into {args.teacher_cache}")
        cache = face_teacher.extract(args.data_dir, args.teacher_cache, missing, flips=False)
    index = {k: i for i, k in enumerate(cache["paths"].tolist())}
    rows = np.asarray([index[k] for k in keys])
    plain = cache["embedding"][rows]
    mirrored = np.where(cache["has_flip"][rows, None], cache["embedding_flip"][rows], plain)
    return plain, mirrored, int(cache["has_flip"][rows].sum()), int(cache["hog"][rows].sum())


def centred_unit(embeddings: np.ndarray, mean: np.ndarray) -> torch.Tensor:
    """Distillation targets. dlib's descriptors share one large common direction (cosine ~0.91 with their mean;
    different people still ~0.83 with each other), so a raw-cosine target is mostly that constant: centring on
    the training photos' mean leaves the part that tells people apart (different people then ~0)."""
    centred = embeddings - mean
    return torch.from_numpy((centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32))


def decoded(photo: FacePhoto) -> Image.Image:
    """The photo as the service decodes an upload of its file (JPEG for LFW, PGM for AT&T)."""
    return decode_image(photo.path.read_bytes(), MAX_PIXELS, "RGB")


def box_crop(image: Image.Image, photo: FacePhoto, margin: float) -> Image.Image:
    """The crop around the photo's landmark box, or around the whole photo (margin 0) when it has none."""
    if photo.box is None:
        return crop_face(image, (0, 0, *image.size), 0.0, SIZE)
    return crop_face(image, photo.box, margin, SIZE)


def crop_tensor(crop: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(crop)


class TrainBatches:
    """One epoch: photos of a person in pairs (so pair losses see positives), shuffled by a generator
    seeded with the epoch, augmented on the fly."""

    def __init__(self, recipe: FaceRecipe, epoch: int) -> None:
        self.recipe, self.epoch = recipe, epoch
        generator = torch.Generator().manual_seed(recipe.args.seed * 1000 + epoch)
        units: list[list[int]] = []
        for members in recipe.members:
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            units += [order[i : i + 2] for i in range(0, len(order), 2)]
        units = [units[i] for i in torch.randperm(len(units), generator=generator).tolist()]
        flat = [i for unit in units for i in unit]
        size = recipe.args.batch_size
        self.batches = [flat[i : i + size] for i in range(0, len(flat), size)]
        if len(self.batches) > 1 and len(self.batches[-1]) < size // 2:  # a tiny last batch upsets batch-norm
            last = self.batches.pop()
            self.batches[-1] += last

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.recipe.make_batch(self.batches[index])

    def __iter__(self):
        # Augmentations draw from torch's global generator: seeded per epoch so --resume repeats the run
        # (data-loading workers are seeded from it too).
        torch.manual_seed(self.recipe.args.seed * 1000 + self.epoch)
        if self.recipe.args.workers:
            yield from DataLoader(self, batch_size=None, shuffle=False, num_workers=self.recipe.args.workers)
        else:
            yield from (self[i] for i in range(len(self)))


class FaceRecipe:
    def __init__(self, args: argparse.Namespace, split: Split) -> None:
        self.args, self.split = args, split
        self.autocast = bf16_autocast(args.no_bf16)
        self.jpegs = [p.path.read_bytes() for p in split.train]  # decoded per sample: ~10 kB each instead of 77
        self.members = [np.flatnonzero(split.person == p).tolist() for p in range(int(split.person.max()) + 1)]
        self.distill = args.distill_weight > 0
        if not self.distill and (args.metric_loss == "none" or args.metric_weight <= 0):
            raise SystemExit("nothing to learn from: give --distill-weight or a --metric-loss with --metric-weight above 0")
        if self.distill:
            if args.dim != face_teacher.DIM:
                raise SystemExit(f"distillation needs the teacher's embedding size: --dim {face_teacher.DIM}")
            plain, mirrored, self.teacher_mirrors, self.teacher_hog = teacher_targets(args, split.train)
            mean = plain.mean(0)
            self.targets, self.targets_mirrored = centred_unit(plain, mean), centred_unit(mirrored, mean)
            self.val_targets = centred_unit(teacher_targets(args, split.val)[0], mean)
        self.val_crops = torch.stack([crop_tensor(box_crop(decoded(p), p, args.margin)) for p in split.val])
        # Input statistics from training photos only: the held-out people calibrate the thresholds.
        count = min(len(split.train), STATISTICS_PHOTOS)
        photos = [split.train[i] for i in np.random.default_rng(args.seed).choice(len(split.train), count, replace=False)]
        statistics = ChannelStatistics()
        for photo in photos:
            statistics.add(crop_tensor(box_crop(decoded(photo), photo, args.margin)).permute(1, 2, 0).numpy())
        self.mean, self.std = statistics.result()
        self.photometric = v2.Compose(
            # No hue jitter: it would cost more CPU than the rest of the augmentation together.
            [v2.RandomGrayscale(0.2), v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)]
        )

        self.model = FaceNet(args.dim, tuple(args.widths), tuple(args.depths), args.stem, args.dropout, SIZE[0])
        # channels-last only with bf16 (its speed-up): oneDNN's fp32 channels-last backward of a strided 1x1 conv with few
        # channels crashes (torch 2.x, seen with 8 -> 16 channels).
        self.memory_format = torch.channels_last if self.autocast else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        classes = int(split.arc_class.max()) + 1
        self.arcface = (
            ArcFace(args.dim, max(classes, 1), args.arcface_scale, args.arcface_margin) if args.metric_loss == "arcface" else None
        )
        parameters = list(self.model.named_parameters()) + (list(self.arcface.named_parameters()) if self.arcface else [])
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for _, p in parameters if p.ndim > 1], "weight_decay": args.weight_decay},
                {"params": [p for _, p in parameters if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=args.lr,
        )
        self.steps_per_epoch = len(TrainBatches(self, 0))
        self.total_steps = self.steps_per_epoch * args.epochs
        self.step = 0

    # -- data --
    def augment(self, index: int) -> tuple[torch.Tensor, bool]:
        image = Image.open(io.BytesIO(self.jpegs[index])).convert("RGB")
        box = self.split.train[index].box
        assert box is not None, "training photos all have a landmark box"
        x1, y1, x2, y2 = box
        side = max(x2 - x1, y2 - y1)
        shift = (torch.rand(2) * 2 - 1) * self.args.box_shift * side
        half = side / 2 * (1 + (float(torch.rand(())) * 2 - 1) * self.args.box_scale)
        cx, cy = (x1 + x2) / 2 + float(shift[0]), (y1 + y2) / 2 + float(shift[1])
        crop = crop_face(image, (cx - half, cy - half, cx + half, cy + half), self.args.margin, SIZE)
        mirrored = bool(torch.rand(()) < 0.5)
        if mirrored:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.photometric(crop_tensor(crop)), mirrored

    def make_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.augment(i) for i in indices]
        batch = {
            "images": torch.stack([image for image, _ in samples]),
            "person": torch.from_numpy(self.split.person[indices]),
            "arc_class": torch.from_numpy(self.split.arc_class[indices]),
        }
        if self.distill:
            mirrored = torch.tensor([m for _, m in samples])
            rows = torch.tensor(indices)
            batch["teacher"] = torch.where(mirrored[:, None], self.targets_mirrored[rows], self.targets[rows])
        return batch

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return ((images.float() / 255 - mean) / std).contiguous(memory_format=self.memory_format)

    # -- engine interface --
    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, int(self.args.warmup_epochs * self.steps_per_epoch), self.total_steps)

    def train_batches(self, epoch: int) -> TrainBatches:
        return TrainBatches(self, epoch)

    def metric_loss(self, embeddings: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.arcface is not None:
            keep = batch["arc_class"] >= 0
            if not keep.any():
                return embeddings.sum() * 0.0
            return self.arcface(embeddings[keep], batch["arc_class"][keep])
        if self.args.metric_loss == "triplet":
            return batch_hard_triplet(embeddings, batch["person"], self.args.triplet_margin)
        return contrastive(embeddings, batch["person"], self.args.contrastive_margin)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.lr_factor(self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            embeddings = self.model(self.normalise(batch["images"])).float()
        loss = embeddings.new_zeros(())
        logged: dict[str, float] = {}
        if self.distill:
            distill = distillation(embeddings, batch["teacher"])
            loss = loss + self.args.distill_weight * distill
            logged["teacher_cos"] = 1 - distill.item()
        if self.args.metric_loss != "none" and self.args.metric_weight > 0:
            metric = self.metric_loss(embeddings, batch)
            loss = loss + self.args.metric_weight * metric
            logged[self.args.metric_loss] = metric.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), **logged, "lr": self.optimizer.param_groups[0]["lr"]}

    def end_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def embed(self, crops: torch.Tensor, batch: int = 128) -> torch.Tensor:
        served = Normalised(self.model, flip=not self.args.no_flip_tta).eval()  # the curves measure what is served
        return torch.cat([served(self.normalise(crops[i : i + batch])) for i in range(0, len(crops), batch)])

    def evaluate(self) -> dict[str, float]:
        """Held-out people (landmark crops, every pair): AUC, TAR at FAR 1e-2 and 1e-3, agreement with the teacher."""
        embeddings = self.embed(self.val_crops)
        keys = [p.key for p in self.split.val]
        i, j, same = lfw.all_pairs(keys)
        scores = (embeddings[i] * embeddings[j]).sum(1).numpy()
        result = {
            "auc": roc_auc(scores, same),
            "tar_far1e-2": tar_at_far(scores, same, 1e-2),
            "tar_far1e-3": tar_at_far(scores, same, 1e-3),
        }
        if self.distill:
            result["teacher_cos"] = float((embeddings * self.val_targets).sum(1).mean())
        return result

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}
        if self.arcface is not None:
            state["arcface"] = self.arcface.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if self.arcface is not None:
            self.arcface.load_state_dict(state["arcface"])


# ---------------------------------------------------------------------------------------------
# Serving-side evaluation: the exported graph under ONNX Runtime, the service's crops


class Served:
    """The exported embedder and (when given) the face detector, run as the service runs them."""

    def __init__(self, onnx_path: Path, manifest: Manifest, detector_dir: Path | None) -> None:
        self.manifest = manifest
        self.embedder = OnnxModel(onnx_path, manifest.input.name, ["embedding"], threads=1)
        self.detector: Manifest | None = None
        if detector_dir is not None:
            self.detector = Manifest.read(detector_dir)
            outputs = [self.detector.outputs["boxes"], self.detector.outputs["scores"]]
            self.detector_model = OnnxModel(detector_dir / self.detector.file, self.detector.input.name, outputs, threads=1)

    def largest_face(self, image: Image.Image) -> tuple[float, float, float, float] | None:
        assert self.detector is not None
        tensor, letterbox = detection.preprocess(image, self.detector)
        boxes, scores = self.detector_model.run(tensor)
        faces = faces_from_outputs(boxes[0], scores[0], letterbox, self.detector)
        return faces[0].box if faces else None

    def embed(self, crops: list[Image.Image], batch: int = 64) -> np.ndarray:
        spec = self.manifest.input
        out = []
        for start in range(0, len(crops), batch):
            tensor = np.stack([normalise(to_array(c), spec.mean, spec.std) for c in crops[start : start + batch]])
            out.append(self.embedder.run(tensor)[0])
        return np.concatenate(out) if out else np.zeros((0, self.manifest.defaults["embedding_size"]), np.float32)

    def crops(self, photos: list[FacePhoto], margin: float) -> tuple[list[Image.Image], list[Image.Image | None]]:
        """Per photo: the landmark-box (or whole-photo) crop, and the detector's crop (None: no face found)."""
        boxed, detected = [], []
        for photo in photos:
            image = decoded(photo)
            boxed.append(box_crop(image, photo, margin))
            if self.detector is not None:
                face = self.largest_face(image)
                detected.append(None if face is None else crop_face(image, face, margin, SIZE))
        return boxed, detected

    def embed_optional(self, crops: list[Image.Image | None]) -> list[np.ndarray | None]:
        found = [c for c in crops if c is not None]
        vectors = iter(self.embed(found))
        return [None if c is None else next(vectors) for c in crops]


def embedding_latency(served: Served, crop: Image.Image, repeats: int = 50) -> float:
    """Median milliseconds to embed one crop (pre-processing + graph, batch 1, one ORT thread)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        served.embed([crop])
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 2)


def verification(embeddings: dict[str, np.ndarray | None], pairs: list[lfw.Pair], threshold: float) -> dict[str, float]:
    """DevTest numbers. A pair with a face missing counts as an error and is left out of AUC/TAR."""
    scored = [(float(a @ b), p.same) for p in pairs if (a := embeddings[p.a]) is not None and (b := embeddings[p.b]) is not None]
    scores = np.asarray([s for s, _ in scored])
    same = np.asarray([t for _, t in scored])
    correct = int(((scores >= threshold) == same).sum())
    best, best_threshold = best_accuracy(scores, same)
    return {
        "accuracy": correct / len(pairs),
        "pairs_missing_a_face": len(pairs) - len(scored),
        "best_threshold_accuracy": best * len(scored) / len(pairs),
        "best_threshold": best_threshold,
        "auc": roc_auc(scores, same),
        "tar_far1e-2": tar_at_far(scores, same, 1e-2),
    }


def att_metrics(vectors: list[np.ndarray | None], people: int) -> dict[str, float]:
    grid = [vectors[p * 10 : p * 10 + 10] for p in range(people)]
    return {
        "rank1": one_shot_rank1(grid, 0),
        "rank1_mean_over_enrolled_photo": float(np.mean([one_shot_rank1(grid, k) for k in range(10)])),
        "missed": sum(v is None for v in vectors),
    }


def export(recipe: FaceRecipe, args: argparse.Namespace, fitted: FitResult) -> dict[str, Any]:
    run_dir = args.runs_dir / args.name
    onnx_path = run_dir / "model.onnx"
    served_module = Normalised(recipe.model, flip=not args.no_flip_tta).eval().float().to(memory_format=torch.contiguous_format)
    export_onnx(served_module, torch.zeros(2, 3, *SIZE), onnx_path, output_names=["embedding"])

    # Parity on the held-out crops (two batch sizes: the axis is dynamic).
    parity = OrtParity(served_module, onnx_path, EMBEDDING_TOLERANCE)
    worst_cosine = 1.0
    for start, size in ((0, 1), (1, 64)):
        crops = recipe.val_crops[start : start + size]
        (reference,), (actual,) = parity.run(recipe.normalise(crops).contiguous())
        worst_cosine = min(worst_cosine, float((reference * actual).sum(1).min()))
    parity.check()
    if 1 - worst_cosine > COSINE_TOLERANCE:
        raise ParityError(f"ONNX Runtime and PyTorch embeddings disagree: cosine {worst_cosine:.6f}")

    detector_dir = None if args.detector == "none" or not (Path(args.detector) / "model.json").exists() else Path(args.detector)
    manifest = make_manifest(recipe, args, threshold=0.0, far=0.0)
    served = Served(onnx_path, manifest, detector_dir)
    started = time.perf_counter()

    # Threshold: the held-out people's pairs, cut the way the service cuts (detector misses fall back to the box).
    boxed, detected = served.crops(recipe.split.val, args.margin)
    calibration_crops = detected if detector_dir is not None else boxed
    val_missed = sum(c is None for c in calibration_crops)
    val_vectors = served.embed([d if d is not None else b for d, b in zip(calibration_crops, boxed, strict=True)])
    i, j, same = lfw.all_pairs([p.key for p in recipe.split.val])
    val_scores = (val_vectors[i] * val_vectors[j]).sum(1)
    if args.threshold_rule == "far":
        threshold = threshold_at_far(val_scores[~same], args.far)
    else:
        threshold = balanced_threshold(val_scores, same)
    measured_far = float((val_scores[~same] >= threshold).mean())
    calibration = {
        "people": len(recipe.split.val_people),
        "photos": len(recipe.split.val),
        "matched_pairs": int(same.sum()),
        "mismatched_pairs": int((~same).sum()),
        "crops": "face detector" if detector_dir is not None else "landmark boxes",
        "detector_missed": val_missed,
        "rule": "best balanced accuracy" if args.threshold_rule == "balanced" else f"FAR {args.far:g}",
        "measured_far": measured_far,
        "tar": float((val_scores[same] >= threshold).mean()),
        "balanced_accuracy": float(((val_scores[same] >= threshold).mean() + (val_scores[~same] < threshold).mean()) / 2),
        "auc": roc_auc(val_scores, same),
        "tar_far1e-2": tar_at_far(val_scores, same, 1e-2),
        "threshold_at_far1e-2": threshold_at_far(val_scores[~same], 1e-2),
        "threshold_at_far1e-3": threshold_at_far(val_scores[~same], 1e-3),
        "flip_tta": not args.no_flip_tta,
    }

    # DevTest.
    pairs = lfw.read_pairs(args.data_dir / "pairs" / "pairsDevTest.txt")
    if args.eval_limit:  # as many matched as mismatched pairs (slicing halves counted pairs twice in a short file)
        half = args.eval_limit // 2
        pairs = [p for p in pairs if p.same][:half] + [p for p in pairs if not p.same][:half]
    marks = lfw.read_landmarks(args.data_dir)
    devtest_photos = lfw_photos(args.data_dir, sorted({p.a for p in pairs} | {p.b for p in pairs}), marks)
    boxed, detected = served.crops(devtest_photos, args.margin)
    keys = [p.key for p in devtest_photos]
    boxed_devtest = verification(dict(zip(keys, served.embed(boxed), strict=True)), pairs, threshold)
    metrics: dict[str, Any] = {
        "dataset": "lfw View 1 DevTest",
        "pairs": len(pairs),
        "threshold": threshold,
        "far": measured_far,
    }
    if detector_dir is not None:
        detected_devtest = verification(dict(zip(keys, served.embed_optional(detected), strict=True)), pairs, threshold)
        metrics.update({f"devtest_{k}": v for k, v in detected_devtest.items()})
        metrics["devtest_detector_missed_photos"] = sum(c is None for c in detected)
        metrics.update({f"devtest_landmark_crops_{k}": v for k, v in boxed_devtest.items() if k != "pairs_missing_a_face"})
    else:
        metrics.update({f"devtest_{k}": v for k, v in boxed_devtest.items() if k != "pairs_missing_a_face"})
        metrics["devtest_crops"] = "landmark boxes (no face detector yet)"

    # AT&T one-shot.
    att = att_photos(args.att_dir, args.eval_limit and max(2, args.eval_limit // 10))
    flat = [p for person in att for p in person]
    whole, detected = served.crops(flat, args.margin)
    metrics.update(
        {f"att_whole_photo_{k}": v for k, v in att_metrics(list(served.embed(whole)), len(att)).items() if k != "missed"}
    )
    if detector_dir is not None:
        metrics.update({f"att_detected_{k}": v for k, v in att_metrics(served.embed_optional(detected), len(att)).items()})
    metrics["att_people"] = len(att)
    metrics["calibration"] = calibration
    metrics["parity_max_abs_diff"] = parity.max_abs_diff
    metrics["parity_min_cosine"] = worst_cosine
    metrics["evaluation_seconds"] = round(time.perf_counter() - started, 1)
    metrics["latency_ms_per_face"] = embedding_latency(served, boxed[0])

    # 1:N takes the FAR 1e-2 point, or the 1:1 threshold where that is already stricter (labelled with its own FAR).
    identify_threshold = max(threshold, float(calibration["threshold_at_far1e-2"]))
    stricter = {1e-3: float(calibration["threshold_at_far1e-3"])}
    manifest = make_manifest(recipe, args, threshold, measured_far, detector_dir, identify_threshold, stricter)
    manifest.metrics = metrics
    manifest.training = fit_record(
        args,
        fitted,
        train_photos=len(recipe.split.train),
        train_people=int(recipe.split.person.max()) + 1,
        held_out_people=len(recipe.split.val_people),
        excluded_devtest_people=recipe.split.excluded_people,
        teacher={
            "model": "dlib_face_recognition_resnet_model_v1 (face_recognition_models)",
            "photos": len(recipe.split.train),
            "mirrored_photos": recipe.teacher_mirrors,
            "hog_found_face": recipe.teacher_hog,
        }
        if recipe.distill
        else None,
        loss={"distill_weight": args.distill_weight, "metric": args.metric_loss, "metric_weight": args.metric_weight},
    )
    card = model_card(args, manifest, recipe, onnx_path, fitted.history)
    write_model_folder(args.models_dir / args.name, onnx_path, manifest, card, run_dir / "curves.png")
    return metrics


def make_manifest(
    recipe: FaceRecipe,
    args: argparse.Namespace,
    threshold: float,
    far: float,
    detector_dir: Path | None = None,
    identify_threshold: float | None = None,
    far_thresholds: dict[float, float] | None = None,
) -> Manifest:
    return Manifest(
        name=args.name,
        task=Task.face_embedding,
        version="1",
        sha256="0" * 64,
        input=InputSpec(
            name="input",
            color="RGB",
            size=SIZE,
            resize="stretch",
            mean=[round(v, 6) for v in recipe.mean],
            std=[round(v, 6) for v in recipe.std],
        ),
        outputs={"embedding": "embedding"},
        defaults={
            "threshold": round(threshold, 6),
            "far": round(far, 6),  # measured on the held-out training-side pairs at that threshold
            "threshold_rule": "best balanced accuracy" if args.threshold_rule == "balanced" else f"FAR {args.far:g}",
            # 1:N search compares a probe with every subject, so its false matches add up: galleries
            # default to the stricter FAR 1e-2 point of the same held-out pairs.
            "identify_threshold": round(identify_threshold if identify_threshold is not None else threshold, 6),
            "identify_far": 0.01 if identify_threshold is not None and identify_threshold > threshold else round(far, 6),
            "similarity": "cosine",
            "crop_margin": args.margin,
            "detector": detector_dir.name if detector_dir is not None else "face-detector",
            "embedding_size": args.dim,
            # Further calibrated points for ?far= (the two above answer far= too).
            **({"far_thresholds": {far: round(value, 6) for far, value in far_thresholds.items()}} if far_thresholds else {}),
        },
    )


def model_card(
    args: argparse.Namespace, manifest: Manifest, recipe: FaceRecipe, onnx_path: Path, history: list[dict[str, float]]
) -> str:
    m, t, c = manifest.metrics, manifest.training, manifest.metrics["calibration"]
    params = sum(p.numel() for p in recipe.model.parameters())
    detector = "detector" in c["crops"]
    devtest_rows = {k: v for k, v in m.items() if k.startswith(("devtest_", "att_"))}
    teacher = (
        "dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat` from the CC0 `face_recognition_models` "
        "package, trained by dlib on ~3M faces): its 128-d descriptor of each training photo, centred on the training photos' "
        "mean and L2-normalised (raw descriptors share one dominant direction); dlib computes it on its own 5-point "
        "aligned 150x150 chip (face rectangle: dlib's HOG detection overlapping the LFW landmark box, else that box); cached "
        f"once by `training/face_teacher.py`: {t['teacher']['photos']} photos (HOG found {t['teacher']['hog_found_face']}),"
        f" {t['teacher']['mirrored_photos']} mirrored copies (a mirrored crop otherwise takes the plain photo's embedding). "
        "The teacher is a training-time extra; the served graph is this CNN alone."
        if recipe.distill
        else "none"
    )
    end_to_end = (
        f"**{m['devtest_accuracy']:.4f}** end to end (face detector -> crop -> embed; a pair with a missed face is an error; "
        f"{m['devtest_detector_missed_photos']} of the DevTest photos had no face found); on crops of the landmark boxes "
        f"{m['devtest_landmark_crops_accuracy']:.4f}"
        if detector
        else f"**{m['devtest_accuracy']:.4f}** on crops of the landmark boxes (no face detector was available)"
    )
    far_reason = (
        "Rule: the best balanced accuracy ((TAR + TNR) / 2), because DevTest-style verification of pairs half matched and"
        f" half not weighs false accepts and false rejects alike; it accepts {c['measured_far']:.2%} of the mismatched"
        f" held-out pairs (`defaults.far`). The FAR 1e-2 threshold would be {c['threshold_at_far1e-2']:.4f} (TAR there"
        f" {c['tar_far1e-2']:.4f})."
        if args.threshold_rule == "balanced"
        else f"Rule: FAR {args.far:g} (`--threshold-rule far --far`)."
    )
    return f"""# {manifest.name}

Face embedder: a 112x112 RGB face crop -> a unit-length {args.dim}-d embedding; two faces match when
the cosine similarity of their embeddings is >= `defaults.threshold` = {m["threshold"]:.4f}. Gallery
identification (1:N) accepts a match from `defaults.identify_threshold` = {manifest.defaults["identify_threshold"]:.4f} (FAR about
{manifest.defaults["identify_far"]:g} on the held-out pairs), since a probe's false matches add up over every enrolled subject.

## Result
All numbers are from ONNX Runtime running the exported graph with the service's pre-processing.

- LFW View 1 DevTest ({m["pairs"]} pairs; none of these people was used for training, tuning or calibration):
  accuracy at the served threshold {end_to_end}.
- AT&T one-shot identification (enroll photo 1 of each of {m["att_people"]} people, identify the other 9; rank-1):
  whole-photo crops {m["att_whole_photo_rank1"]:.4f}{
        f", through the face detector {m['att_detected_rank1']:.4f}" if detector else ""
    }.
- Threshold: calibrated on all {c["mismatched_pairs"]:,} mismatched / {c["matched_pairs"]:,} matched pairs of
  {c["people"]} held-out training-side people ({c["photos"]} photos; crops from the {c["crops"]}): TAR {c["tar"]:.4f} at
  FAR {c["measured_far"]:.4f} there, AUC {c["auc"]:.4f}.
  {far_reason} The FAR 1e-3 threshold there is {c["threshold_at_far1e-3"]:.4f} (fewer false accepts, for large galleries).

{metrics_table(devtest_rows)}

"best_threshold" rows pick the threshold on DevTest itself (an oracle, for comparison only).
Peers on the same data: Eigenfaces ~0.60, LBP ~0.73-0.85; dlib's ResNet (the teacher, via the `face_recognition` package, as
measured in `DESIGN.md`) 0.989 DevTest / 0.978 AT&T one-shot at ~85 ms per face.

## Model
IResNet-style CNN (`training/nets/face.py`): stem 3x3/2 ({args.stem}), stages {list(args.widths)} x {list(args.depths)}
blocks, global depthwise conv head, linear -> BN -> {args.dim}-d, L2-normalised inside the graph{
        "" if args.no_flip_tta else " (the sum of the embeddings of the crop and of its mirror image)"
    };
{params / 1e6:.2f} M parameters, {onnx_path.stat().st_size / 1e6:.1f} MB ONNX, dynamic batch;
{m["latency_ms_per_face"]:.1f} ms per face (batch 1, one ONNX Runtime thread, pre-processing included; detection not included).
Crops: `service.tasks.faces.crop_face` with margin {args.margin} around the face box (the largest face the
`{manifest.defaults["detector"]}` model finds), resized to 112x112; input normalised by mean/std of training-side crops.

## Training (what went in)
- data: `{t["data"]}`: {t["train_photos"]} photos of {t["train_people"]} people. Left out: the {t["excluded_devtest_people"]}
  people of `pairsDevTest.txt` (all their photos) and {t["held_out_people"]} seeded held-out people (validation and calibration).
- teacher: {teacher}
- loss: {args.distill_weight} x (1 - cos(student, teacher)) + {args.metric_weight} x {args.metric_loss}
  ({metric_loss_words(args)}).
- crops of the LFW landmark boxes jittered by +-{args.box_shift:.0%} shift and +-{args.box_scale:.0%} size, mirror (target: the
  teacher's embedding of the mirrored photo when cached), colour jitter, 20 % grayscale.
- {args.epochs} epochs, batch {args.batch_size} (photos of a person in pairs), AdamW lr {args.lr}, weight decay
  {args.weight_decay}, warm-up {args.warmup_epochs} epoch then cosine;
  bf16 autocast: {recipe.autocast}.
- last epoch on the held-out people: AUC {history[-1].get("val_auc", float("nan")):.4f}, TAR@FAR=1e-2
  {history[-1].get("val_tar_far1e-2", float("nan")):.4f}; the last epoch is exported (nothing selected on DevTest).
{provenance(t)}

![curves](curves.png)
"""


def metric_loss_words(args: argparse.Namespace) -> str:
    """The card's words for the metric loss (it named ArcFace's settings whatever the loss was)."""
    return {
        "arcface": f"ArcFace s={args.arcface_scale}, m={args.arcface_margin}, classes = people with >= 2 training photos",
        "triplet": f"batch-hard triplet, margin {args.triplet_margin}",
        "contrastive": f"contrastive, margin {args.contrastive_margin}",
    }.get(args.metric_loss, "no metric loss")


def main(args: argparse.Namespace) -> None:
    args.teacher_cache = args.teacher_cache or args.runs_dir / "face-teacher" / "teacher.npz"
    start_run(args.seed, args.threads)
    split = make_split(args)
    print(
        f"{len(split.train)} training photos of {int(split.person.max()) + 1} people; {len(split.val)} held-out photos of "
        f"{len(split.val_people)} people; {split.excluded_people} DevTest people ({split.excluded_photos} photos) left out"
    )
    recipe = FaceRecipe(args, split)
    result = fit(recipe, args.epochs, args.runs_dir / args.name, args.resume, args.eval_every, args.stop_after, vars(args))
    if not result.finished:
        print(f"stopped after epoch {len(result.history)} of {args.epochs}; continue with --resume")
        return
    metrics = export(recipe, args, result)
    print(
        f"exported {args.models_dir / args.name}: DevTest accuracy {metrics['devtest_accuracy']:.4f} at threshold "
        f"{metrics['threshold']:.4f} (held-out FAR {metrics['far']:.4f}), AUC {metrics['devtest_auc']:.4f}, "
        f"AT&T rank-1 {metrics['att_whole_photo_rank1']:.4f} (whole photos)"
    )
