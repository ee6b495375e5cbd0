"""Whether each face wears a mask (``?mask=true`` on embed and identify), as CompreFace's mask plugin answers it.

A loaded detector whose labels include ``with_mask`` and ``without_mask`` (the reference ``facemask-detector``)
runs on the same photo; each face takes the label of the mask detection that overlaps its box most (IoU at least
``MIN_IOU``), or none when no detection does. The face boxes stay the face detector's: the two models' boxes
differ, so a face is never dropped or added by this.
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

MaskQuery = Annotated[
    bool,
    Query(description="also say whether each face wears a mask (a loaded detector with with_mask/without_mask labels)"),
]


class Mask(BaseModel):
    label: str = Field(description="the mask detector's class: with_mask, without_mask, mask_weared_incorrect")
    score: float


def mask_detector(request: Request) -> LoadedModel:
    repository: ModelRepository = request.app.state.repository
    for model in sorted(repository.loaded.values(), key=lambda m: m.name):
        if model.manifest.task == Task.detection and set(model.manifest.labels) >= MASK_LABELS:
            return model
    raise ApiError(
        503, "no_mask_detector", "no mask detector is loaded (a detection model with with_mask and without_mask labels)"
    )


async def masks_of(request: Request, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> list[Mask | None]:
    """For each face box of ``image`` (in its pixels): the best-overlapping mask detection, or None."""
    model = mask_detector(request)
    manifest = model.manifest
    with model.batcher.announce():
        seen = image.convert("L") if manifest.input.color == "GRAY" else image
        inputs, letterbox = await image_thread(detection.preprocess, seen, manifest)
    outputs = await run_by_role(model, inputs, request.app.state.settings)

    def match() -> list[Mask | None]:
        score, iou, limit = detection.manifest_thresholds(manifest)
        found, scores, labels = detection.select(outputs["boxes"][0], outputs["scores"][0], score, iou, limit, content=letterbox)
        found = detection.to_original(found, letterbox)
        masks: list[Mask | None] = []
        for box in boxes:
            overlaps = detection.box_iou(np.asarray(box, np.float32), found) if len(found) else np.zeros(0)
            best = int(np.argmax(overlaps)) if len(overlaps) else -1
            if best < 0 or overlaps[best] < MIN_IOU:
                masks.append(None)
            else:
                masks.append(Mask(label=manifest.labels[int(labels[best])], score=float(scores[best])))
        return masks

    return await image_thread(match)
