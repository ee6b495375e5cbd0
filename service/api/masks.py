"""Whether each face wears a mask (``?mask=true`` on embed and identify), as CompreFace's mask plugin answers it.

A loaded detector whose labels include ``with_mask`` and ``without_mask`` (the reference ``facemask-detector``)
runs on the same photo; each face takes the label of the mask detection that overlaps its box most (IoU at least
``MIN_IOU``), or none when no detection does. That detector learnt from scenes where faces are small: a photo
whose largest face is a large share of it (a portrait, a face crop) is first centred on a canvas of the
detector's padding colour, so that the face takes at most ``MAX_FACE_SHARE`` of it. The face boxes stay the face
detector's: no face is dropped or added by this.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import Query, Request
from PIL import Image
from pydantic import BaseModel, Field

from service.api.deps import run_by_role
from service.api.errors import ApiError
from service.manifest import Task
from service.repository import LoadedModel, ModelRepository
from service.tasks import detection
from service.workers import image_thread

MASK_LABELS = {"with_mask", "without_mask"}
MIN_IOU = 0.3  # the face detector's box and the mask detector's for one face overlap by 0.6-0.9 on facemask photos
MAX_FACE_SHARE = 0.25  # of the canvas side; a close-up LFW portrait found no mask box at all without the canvas

Box = tuple[float, float, float, float]
MaskQuery = Annotated[
    bool,
    Query(description="also say whether each face wears a mask (a loaded detector with with_mask/without_mask labels)"),
]


class Mask(BaseModel):
    label: str = Field(description="the mask detector's best class: with_mask, without_mask, mask_weared_incorrect")
    score: float = Field(description="its confidence that a face is there: the class scores summed, as the face detector's")


def mask_detector(request: Request) -> LoadedModel:
    repository: ModelRepository = request.app.state.repository
    for model in sorted(repository.loaded.values(), key=lambda m: m.name):
        if model.manifest.task == Task.detection and set(model.manifest.labels) >= MASK_LABELS:
            return model
    message = "no mask detector is loaded (a detection model with with_mask and without_mask labels)"
    raise ApiError(503, "no_mask_detector", message)


def on_canvas(
    image: Image.Image, boxes: list[Box], fill: tuple[int, ...], max_side: int
) -> tuple[Image.Image, float, float, float]:
    """``image`` centred on a canvas large enough that its largest face takes at most MAX_FACE_SHARE of the side
    (the image itself when it already is): the canvas, the image's offset in it and its scale. A canvas larger
    than ``max_side`` (the detector's input, which the letterbox shrinks it to anyway) is made at that side, the
    image scaled down with it: at full size, a whole 4000x3000 photo as the face (``detect=false``) needed a
    16000x16000 canvas (1 GB)."""
    largest = max(max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes)
    side = max(image.width, image.height, round(largest / MAX_FACE_SHARE))
    if side == max(image.width, image.height):
        return image, 0.0, 0.0, 1.0
    scale = min(1.0, max_side / side)
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        side = max_side
    canvas = Image.new("RGB", (side, side), fill)
    left, top = (side - image.width) // 2, (side - image.height) // 2
    canvas.paste(image.convert("RGB"), (left, top))
    return canvas, float(left), float(top), scale


async def masks_of(request: Request, model: LoadedModel, image: Image.Image, boxes: list[Box]) -> list[Mask | None]:
    """For each face box of ``image`` (in its pixels): the best-overlapping mask detection, or None. A box that is
    the whole image (``detect=false``) takes the best detection centred in it."""
    manifest = model.manifest

    def prepare() -> tuple[np.ndarray, detection.Letterbox, float, float, float]:
        max_side = max(manifest.input.size or (image.width, image.height))
        canvas, left, top, scale = on_canvas(image, boxes, detection.fill_color(manifest.input.mean), max_side)
        seen = canvas.convert("L") if manifest.input.color == "GRAY" else canvas
        inputs, letterbox = detection.preprocess(seen, manifest)
        return inputs, letterbox, left, top, scale

    with model.batcher.announce():
        inputs, letterbox, left, top, scale = await image_thread(prepare)
    outputs = await run_by_role(model, inputs, request.app.state.settings)
    whole = (0.0, 0.0, float(image.width), float(image.height))

    def match() -> list[Mask | None]:
        score, iou, limit = detection.manifest_thresholds(manifest)
        # One box per face whatever its class: the class scores summed (as the face detector's), its label the best.
        found, sums, labels = detection.select(
            outputs["boxes"][0], outputs["scores"][0], score, iou, limit, agnostic=True, content=letterbox
        )
        found = (detection.to_original(found, letterbox) - np.asarray([left, top, left, top], np.float32)) / scale
        masks: list[Mask | None] = []
        for box in boxes:
            best = -1
            if len(found) and box == whole:  # a face crop: the detection centred in it
                centres = (found[:, :2] + found[:, 2:]) / 2
                inside = np.flatnonzero(np.all((centres >= 0) & (centres <= [image.width, image.height]), axis=1))
                best = int(inside[0]) if len(inside) else -1  # select() answers best first
            elif len(found):
                overlaps = detection.box_iou(np.asarray(box, np.float32), found)
                best = int(np.argmax(overlaps)) if overlaps.max() >= MIN_IOU else -1
            masks.append(None if best < 0 else Mask(label=manifest.labels[int(labels[best])], score=float(sums[best])))
        return masks

    return await image_thread(match)
