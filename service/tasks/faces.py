"""Face crops, the one geometry shared by the embedder's training and the service.

A detected face box becomes a square centred on the box, ``1 + 2 * margin`` times its longer
side, cut from the upright photo (parts outside the photo are black) and resized to the
embedder's input. Training (``training/face.py``) imports this very function, so the network
sees at serving time exactly the crops it was trained and calibrated on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.images import Span
from service.manifest import Manifest, Task
from service.tasks import detection

DEFAULT_MARGIN = 0.2
PHOTO_MARGIN = 0.5  # context kept around an enrolled face for re-embedding by later models
PHOTO_SIDE = 256
FACE_LABEL = "face"


def square_box(box: Sequence[float], margin: float) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` -> the integer square crop box around it with ``margin`` on each side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(1, round(side))
    return left, top, left + size, top + size


def cut(image: Image.Image, region: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    """``image.crop(region).resize(size)`` (``size`` as [W, H]; black where the region leaves the photo), without
    making the region at full size when it is mostly outside the photo: a 120-byte 12000x1 PNG taken whole as a
    face (``detect=false``) made a 12000x12000 square (430 MB) to shrink to 112x112."""
    left, top, right, bottom = region
    inside = (max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))
    inside_area = max(0, inside[2] - inside[0]) * max(0, inside[3] - inside[1])
    enough = 4 * max(inside_area, size[0] * size[1])  # pixels: a face's usual square is mostly inside the photo
    area = (right - left) * (bottom - top)
    if area <= enough:  # as training cut them
        return shrink(image.crop(region), size)
    scale = (enough / area) ** 0.5  # the region made at this scale first: at most `enough` pixels
    canvas = Image.new(image.mode, (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))))
    if inside_area:
        x1, y1 = round((inside[0] - left) * scale), round((inside[1] - top) * scale)
        x2, y2 = max(x1 + 1, round((inside[2] - left) * scale)), max(y1 + 1, round((inside[3] - top) * scale))
        canvas.paste(shrink(image.crop(inside), (x2 - x1, y2 - y1)), (x1, y1))
    return shrink(canvas, size)


def shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` ([W, H]) as face crops are, in training and serving alike."""
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def crop_face(image: Image.Image, box: Sequence[float], margin: float, size: tuple[int, int]) -> Image.Image:
    """The face in ``box`` as a ``size`` ([H, W]) square crop (black where it leaves the photo)."""
    height, width = size
    return cut(image, square_box(box, margin), (width, height))


def enrollment_photo(image: Image.Image, box: Sequence[float], whole: bool) -> tuple[bytes, tuple[float, float, float, float]]:
    """The region kept with an enrolled face (JPEG) and the face's box in it.

    A square of ``PHOTO_MARGIN`` around the face (any embedder's crop with a margin up to that fits
    inside), at most ``PHOTO_SIDE`` pixels wide; the whole upload when it was the face itself.
    """
    if whole:
        left, top, right, bottom = 0, 0, image.width, image.height
    else:
        left, top, right, bottom = square_box(box, PHOTO_MARGIN)
    scale = min(1.0, PHOTO_SIDE / max(right - left, bottom - top))
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    region = cut(image, (left, top, right, bottom), size)
    buffer = io.BytesIO()
    region.convert("RGB").save(buffer, "JPEG", quality=92)
    # Each axis by its own rounded ratio: one unrounded scale put a whole 250x300 photo's box at x2 = 213.33 in the
    # 213 px wide region, outside it.
    across, down = size[0] / (right - left), size[1] / (bottom - top)
    x1, y1, x2, y2 = (float(v) for v in box)
    return buffer.getvalue(), ((x1 - left) * across, (y1 - top) * down, (x2 - left) * across, (y2 - top) * down)


def cosine(value: float | np.floating) -> float:
    """The similarity of two unit embeddings from their float32 dot product, clipped to [-1, 1] (it overshoots 1
    by an ulp for the same face)."""
    return min(1.0, max(-1.0, float(value)))


@dataclass(frozen=True)
class FaceBox:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the upright photo's pixels
    score: float | None  # the detector's confidence; None when the whole photo was taken as the face

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def face_classes(detector: Manifest) -> list[int]:
    """Which of a detector's labels are faces: ``defaults.face_labels`` when given, else labels named ``face``."""
    wanted = detector.defaults.get("face_labels") or [FACE_LABEL]
    return [i for i, label in enumerate(detector.labels) if label in wanted]


def is_face_detector(manifest: Manifest) -> bool:
    return manifest.task == Task.detection and bool(face_classes(manifest))


def faces_from_outputs(
    boxes: np.ndarray,
    scores: np.ndarray,
    letterbox: detection.Letterbox,
    detector: Manifest,
    score_threshold: float | None = None,
    span: Span | None = None,
) -> list[FaceBox]:
    """One image's detector outputs (``boxes [A, 4]``, ``scores [A, C]``) -> its faces, largest first, in the pixels
    of the letterboxed image or of the photo it ``span``s.

    Every face label counts as "a face" (scores summed over them, label-blind NMS), so a face-mask
    detector's three mask classes all find faces.
    """
    default_score, iou, limit = detection.manifest_thresholds(detector)
    threshold = default_score if score_threshold is None else score_threshold
    classes = face_classes(detector)
    kept, kept_scores, _ = detection.select(boxes, scores[:, classes], threshold, iou, limit, agnostic=True, content=letterbox)
    original = detection.to_original(kept, letterbox, span)
    found = [
        FaceBox((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(s))
        for b, s in zip(original, kept_scores, strict=True)
    ]
    return sorted(found, key=lambda face: -face.area)
