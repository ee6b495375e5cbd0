"""Object detection: numpy letterbox, score threshold, class-aware NMS, boxes back to original pixels.

The graph returns, for every one of its ``A`` dense locations, ``boxes [N, A, 4]`` (x1, y1, x2,
y2 in the letterboxed input's pixels) and ``scores [N, A, C]`` (per-class probabilities). Per
request:

1. the upright image is scaled so its longer side fits the input size (aspect ratio kept) and
   centred on a canvas filled with the training mean colour (``letterbox``); the
   :class:`Letterbox` records the scale and offsets;
2. every (location, class) pair whose score passes ``score_threshold`` is a candidate (a box may
   be a candidate for several classes); the best ``pre_nms_top_k`` go on;
3. greedy NMS per class (``iou > iou_threshold`` suppresses, as ``torchvision.ops.batched_nms``),
   then the best ``max_detections`` by score;
4. kept boxes are mapped back through the letterbox (and any JPEG draft down-scaling) into the
   original image's pixels and clipped to it.

``agnostic=True`` treats all classes as one kind of object ("any face" for a face-mask
detector): a location's score is the SUM of its class scores (for a YOLO-style head that is the
objectness, since the class probabilities sum to one), NMS ignores labels, and the label
reported is the most probable class.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.images import Span, normalise, to_array
from service.manifest import Manifest

PRE_NMS_TOP_K = 3000
# For a manifest whose defaults leave them out (the recipes write all three); /v1/detect and faces alike.
SCORE_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS = 0.5, 0.5, 300
# One colour per class for drawn boxes.
COLORS = [(46, 204, 64), (255, 65, 54), (255, 220, 0), (0, 116, 217), (177, 13, 201), (255, 133, 27), (57, 204, 204)]


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed on the model's canvas: ``input = original * scale + pad``."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    width: int  # the image that was letterboxed
    height: int


def manifest_thresholds(manifest: Manifest) -> tuple[float, float, int]:
    """``(score_threshold, iou_threshold, max_detections)`` a detector serves with unless a request says otherwise."""
    defaults = manifest.defaults
    return (
        float(defaults.get("score_threshold", SCORE_THRESHOLD)),
        float(defaults.get("iou_threshold", IOU_THRESHOLD)),
        int(defaults.get("max_detections", MAX_DETECTIONS)),
    )


def fill_color(mean: list[float]) -> tuple[int, ...]:
    """The canvas colour: the training mean, so padding normalises to ~0 (neutral to the network)."""
    return tuple(round(m * 255) for m in mean)


def letterbox_image(image: Image.Image, size: tuple[int, int], fill: tuple[int, ...]) -> tuple[Image.Image, Letterbox]:
    """Scale ``image`` to fit ``size`` ([H, W]) with its aspect ratio and centre it on a filled canvas."""
    height, width = size
    scale = min(width / image.width, height / image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    canvas = Image.new(image.mode, (width, height), fill if image.mode == "RGB" else fill[0])
    canvas.paste(resized, (pad_x, pad_y))
    return canvas, Letterbox(new_w / image.width, new_h / image.height, pad_x, pad_y, image.width, image.height)


def preprocess(image: Image.Image, manifest: Manifest) -> tuple[np.ndarray, Letterbox]:
    """An upright decoded image -> ``[1, C, H, W]`` float32 letterboxed as the manifest describes."""
    spec = manifest.input
    if spec.size is None:
        raise ValueError("a detection model needs a fixed input size")
    canvas, box = letterbox_image(image, spec.size, fill_color(spec.mean))
    return normalise(to_array(canvas), spec.mean, spec.std)[None], box


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``[4]`` box with ``[K, 4]`` boxes (x1y1x2y2), computed as torchvision does."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float32).tiny)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, best score first. A box is dropped when IoU > threshold."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = order[0]
        keep.append(int(best))
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware NMS (boxes of different labels never suppress each other), best score first."""
    kept = [
        np.flatnonzero(labels == label)[nms(boxes[labels == label], scores[labels == label], iou_threshold)]
        for label in np.unique(labels)
    ]
    if not kept:
        return np.zeros(0, np.int64)
    keep = np.concatenate(kept)
    return keep[np.argsort(-scores[keep], kind="stable")]


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    classes: list[int] | None = None,
    agnostic: bool = False,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
    content: Letterbox | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's ``boxes [A, 4]`` and ``scores [A, C]`` -> kept ``(boxes [K, 4], scores [K], labels [K])``.

    Boxes stay in input pixels; ``classes`` (indices) restricts the candidates before NMS, and so does
    ``content``: a box that does not overlap the letterboxed image (wholly in the padding) never
    suppresses a real one nor takes one of the ``max_detections`` places.
    """
    scores = scores.astype(np.float32, copy=False)
    if classes is not None:
        mask = np.zeros(scores.shape[1], bool)
        mask[classes] = True
        scores = np.where(mask[None, :], scores, np.float32(0))
    if agnostic:
        anchor = np.flatnonzero(scores.sum(1) >= score_threshold) if scores.size else np.zeros(0, np.int64)
        score = scores[anchor].sum(1)
        label = scores[anchor].argmax(1) if len(anchor) else np.zeros(0, np.int64)
    else:
        anchor, label = np.nonzero(scores >= score_threshold)
        score = scores[anchor, label]
    if score_threshold <= 0:  # a zero threshold must not turn every (location, class) pair into a box
        positive = score > 0
        anchor, label, score = anchor[positive], label[positive], score[positive]
    finite = np.isfinite(score) & np.isfinite(boxes[anchor]).all(1)  # a model's NaN or inf never becomes an answer
    anchor, label, score = anchor[finite], label[finite], score[finite]
    if content is not None:  # before the top-k cut: boxes in the padding of a very wide photo took its places
        inside = overlaps_image(boxes[anchor], content)
        anchor, label, score = anchor[inside], label[inside], score[inside]
    if len(score) > pre_nms_top_k:
        top = np.argsort(-score, kind="stable")[:pre_nms_top_k]
        anchor, label, score = anchor[top], label[top], score[top]
    candidates = boxes[anchor].astype(np.float32, copy=False)
    keep = nms(candidates, score, iou_threshold) if agnostic else batched_nms(candidates, score, label, iou_threshold)
    keep = keep[:max_detections]
    return candidates[keep], score[keep], label[keep].astype(np.int64)


def to_original(boxes: np.ndarray, box: Letterbox, span: Span | None = None) -> np.ndarray:
    """Input-pixel boxes -> pixels of the letterboxed image, or of the photo it ``span``s (when it was decoded
    smaller than the photo), clipped to it."""
    span = span or Span.whole((box.width, box.height))
    out_w, out_h = span.size
    fx, fy = span.width / box.width, span.height / box.height
    mapped = np.empty_like(boxes, dtype=np.float32)
    mapped[:, [0, 2]] = (boxes[:, [0, 2]] - box.pad_x) / box.scale_x * fx - span.left
    mapped[:, [1, 3]] = (boxes[:, [1, 3]] - box.pad_y) / box.scale_y * fy - span.top
    mapped[:, [0, 2]] = np.clip(mapped[:, [0, 2]], 0, out_w)
    mapped[:, [1, 3]] = np.clip(mapped[:, [1, 3]], 0, out_h)
    return mapped


def overlaps_image(boxes: np.ndarray, box: Letterbox) -> np.ndarray:
    """Which input-pixel boxes overlap the letterboxed image with some area (not only its padding)."""
    x0, y0 = box.pad_x, box.pad_y
    x1, y1 = x0 + box.width * box.scale_x, y0 + box.height * box.scale_y
    wide = np.minimum(boxes[:, 2], x1) > np.maximum(boxes[:, 0], x0)
    return wide & (np.minimum(boxes[:, 3], y1) > np.maximum(boxes[:, 1], y0))


def detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    names: list[str],
) -> list[dict[str, object]]:
    return [
        {
            "label": names[int(label)] if int(label) < len(names) else str(int(label)),
            "index": int(label),
            "score": float(score),
            "box": {"x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3])},
        }
        for b, score, label in zip(boxes, scores, labels, strict=True)
    ]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def draw(image: Image.Image, found: list[dict[str, object]]) -> bytes:
    """The photo as JPEG with each detection's box, label and score drawn on it."""
    photo = image.convert("RGB")
    canvas = ImageDraw.Draw(photo)
    # Scaled to the photo, within bounds: a 20x60000 strip took 2.3 s to draw 300 labels in 1333 px type.
    width = min(12, max(2, round(max(photo.size) / 300)))
    font = _font(min(120, max(11, round(max(photo.size) / 45))))
    for detection in found:
        b = detection["box"]
        assert isinstance(b, dict)
        color = COLORS[int(detection["index"]) % len(COLORS)]  # type: ignore[call-overload]
        canvas.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=color, width=width)
        text = f"{detection['label']} {detection['score']:.2f}"
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        pad = width
        # The label sits above the box, or just inside it when the box touches the top edge.
        y = b["y1"] - (bottom - top) - 2 * pad
        y = y if y >= 0 else b["y1"]
        canvas.rectangle((b["x1"], y, b["x1"] + right - left + 2 * pad, y + bottom - top + 2 * pad), fill=color)
        canvas.text((b["x1"] + pad - left, y + pad - top), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
