"""Training losses.

Detection (:class:`DetectionLoss`) is the YOLO-style loss of the one-stage detector in
``training/nets/yolo.py``: a static centre-prior assignment, then

- box: complete-IoU loss (overlap, centre distance and aspect ratio) on positive cells;
- objectness: sigmoid focal loss over ALL cells, summed and divided by the number of positives,
  so the ~99 % background cells cannot drown the few object cells;
- class: cross-entropy on positive cells (the classes are exclusive kinds of object).

Metric learning for the face embedder (``training/face.py``), all on L2-normalised embeddings:

- :class:`ArcFace`: additive angular margin softmax, logits ``s * cos(theta_y + m)`` for the true
  class and ``s * cos(theta_j)`` for the others (Deng et al. 2019);
- :func:`batch_hard_triplet`: for each anchor its farthest positive and closest negative in the
  batch, hinge on the distance gap (Hermans et al. 2017);
- :func:`contrastive`: every pair in the batch, pull positives together, push negatives beyond
  a margin (Hadsell et al. 2006);
- :func:`distillation`: cosine distance to a teacher's embedding (needs no identity labels).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import complete_box_iou_loss, sigmoid_focal_loss


def level_ranges(strides: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """Object sizes (longest side, pixels) each output stride learns: ``[2 * s, 8 * s]``, open-ended
    at the finest and coarsest level, overlapping so mid-sized objects train both scales."""
    ordered = sorted(strides)
    return {s: (0.0 if i == 0 else 2.0 * s, float("inf") if i == len(ordered) - 1 else 8.0 * s) for i, s in enumerate(ordered)}


@torch.no_grad()
def assign(
    centres: torch.Tensor,
    strides: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_valid: torch.Tensor,
    radius: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-prior assignment for a batch.

    A cell is a candidate for an object when the object's centre lies within ``radius`` strides
    of the cell centre on both axes (the 2x2 nearest cells for radius 1) and the object's size
    suits the cell's stride (:func:`level_ranges`). A cell claimed by several objects takes the
    one whose centre is nearest. Returns ``positive [B, A]`` and the matched object ``[B, A]``.
    """
    if gt_boxes.shape[1] == 0:
        empty = torch.zeros(gt_boxes.shape[0], centres.shape[0], dtype=torch.bool, device=centres.device)
        return empty, torch.zeros_like(empty, dtype=torch.long)
    gt_centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    gt_size = (gt_boxes[..., 2:] - gt_boxes[..., :2]).amax(-1)  # [B, G]
    offset = (centres[None, :, None, :] - gt_centre[:, None, :, :]) / strides[None, :, None, None]  # [B, A, G, 2]
    near = (offset.abs() < radius).all(-1)
    lo = torch.empty_like(strides)
    hi = torch.empty_like(strides)
    for stride, (low, high) in level_ranges(tuple(int(s) for s in strides.unique().tolist())).items():
        lo[strides == stride], hi[strides == stride] = low, high
    fits = (gt_size[:, None, :] >= lo[None, :, None]) & (gt_size[:, None, :] <= hi[None, :, None])
    candidate = near & fits & gt_valid[:, None, :]
    distance = offset.square().sum(-1).masked_fill(~candidate, float("inf"))
    best_distance, matched = distance.min(-1)
    return torch.isfinite(best_distance), matched


class DetectionLoss(nn.Module):
    def __init__(
        self, box_weight: float = 2.0, obj_weight: float = 1.0, cls_weight: float = 0.5, alpha: float = 0.25, gamma: float = 2.0
    ) -> None:
        super().__init__()
        self.box_weight, self.obj_weight, self.cls_weight = box_weight, obj_weight, cls_weight
        self.alpha, self.gamma = alpha, gamma

    def forward(
        self,
        predictions: torch.Tensor,
        boxes: torch.Tensor,
        centres: torch.Tensor,
        strides: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``predictions [B, A, 5 + C]`` (raw), ``boxes [B, A, 4]`` (decoded, pixels), padded targets
        ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]``, ``gt_valid [B, G]``. Returns the loss and its parts."""
        predictions = predictions.float()
        positive, matched = assign(centres, strides, gt_boxes, gt_valid)
        num_pos = max(int(positive.sum()), 1)
        objectness = predictions[..., 4]
        obj_loss = sigmoid_focal_loss(objectness, positive.float(), self.alpha, self.gamma, reduction="sum") / num_pos
        if positive.any():
            batch_index = torch.arange(len(gt_boxes), device=gt_boxes.device)[:, None].expand_as(matched)
            target_boxes = gt_boxes[batch_index[positive], matched[positive]]
            target_labels = gt_labels[batch_index[positive], matched[positive]]
            box_loss = complete_box_iou_loss(boxes[positive], target_boxes, reduction="mean")
            cls_loss = F.cross_entropy(predictions[..., 5:][positive], target_labels)
        else:  # an image crop without objects: only the background term has something to learn
            box_loss = cls_loss = predictions.sum() * 0.0
        loss = self.box_weight * box_loss + self.obj_weight * obj_loss + self.cls_weight * cls_loss
        parts = {
            "box": box_loss.item(),
            "obj": obj_loss.item(),
            "cls": cls_loss.item(),
            "pos": float(positive.sum()) / len(gt_boxes),
        }
        return loss, parts


class ArcFace(nn.Module):
    """Additive angular margin loss over ``classes`` learned class centres (unit vectors).

    Where ``theta_y + m`` would pass pi, the fallback of the paper's code (insightface's ``th``/``mm``, not its
    "easy margin" option) keeps the logit monotonic: ``cos(theta) - m * sin(m)`` replaces ``cos(theta + m)``.
    """

    def __init__(self, dim: int, classes: int, scale: float = 32.0, margin: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight, dim=1)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cosine.gather(1, labels[:, None])
        theta = torch.acos(target)
        with_margin = torch.where(
            theta + self.margin < math.pi, torch.cos(theta + self.margin), target - self.margin * math.sin(self.margin)
        )
        return self.scale * cosine.scatter(1, labels[:, None], with_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)


def _distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between unit vectors: ``sqrt(2 - 2 cos)`` (in [0, 2])."""
    unit = F.normalize(embeddings.float(), dim=1)
    return (2 - 2 * unit @ unit.T).clamp_min(1e-12).sqrt()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Mean over anchors that have a positive in the batch of ``relu(d(a, hardest p) - d(a, hardest n) + margin)``."""
    distance = _distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    anchors = positive.any(1) & (~same).any(1)
    if not anchors.any():
        return embeddings.sum() * 0.0  # no triplet in this batch; keeps the graph connected
    hardest_positive = distance.masked_fill(~positive, 0.0).amax(1)
    hardest_negative = distance.masked_fill(same, float("inf")).amin(1)
    return F.relu(hardest_positive - hardest_negative + margin)[anchors].mean()


def contrastive(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Mean over all pairs of ``d^2`` (same person) or ``relu(margin - d)^2`` (different people)."""
    distance = _distances(embeddings)
    same = labels[:, None] == labels[None, :]
    pairs = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    loss = torch.where(same, distance.square(), F.relu(margin - distance).square())
    return loss[pairs].mean()


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance ``1 - cos(student, teacher)``; the teacher's scale does not matter."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()
