"""``POST /v1/detect``: boxes in the original image's pixels with labels and scores, or the photo with them drawn.

The graph sees the upright (EXIF-applied) photo letterboxed to its input size; thresholds and
class-aware NMS run here in numpy (``service/tasks/detection.py``) and the kept boxes are mapped
back through the letterbox, so coordinates always refer to the uploaded photo as a viewer shows
it. Per-request thresholds override the manifest's ``defaults``.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.deps import PLAIN_ZERO, RAW_BODY_DOC, read_image, require, reserve_pixels, run_by_role
from service.api.errors import ApiError
from service.api.schemas import ERROR_RESPONSES, model_headers
from service.images import decode_for_graph
from service.manifest import Manifest, Task
from service.settings import Settings
from service.tasks import detection
from service.workers import image_thread

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES, dependencies=[require("infer")])

MAX_DETECTIONS_LIMIT = 1000


class Box(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    label: str
    index: int
    score: float
    box: Box  # original-image pixels, x right, y down, (0, 0) = top-left corner of the upright photo


class DetectResponse(BaseModel):
    model: str
    version: str
    width: int  # the upright photo's size, which the boxes refer to
    height: int
    score_threshold: float
    iou_threshold: float
    max_detections: int
    detections: list[Detection]


OPENAPI = {
    **RAW_BODY_DOC,
    "responses": {
        "200": {
            "description": "json: the detections; image: the photo (JPEG) with boxes drawn",
            "content": {"image/jpeg": {}},
            "headers": model_headers(**{"X-Detections": "how many boxes were found (format=image)"}),
        }
    },
}


class Prepared:
    """One decoded request: the graph input, the letterbox, the size to map boxes to, the photo if drawn on."""

    def __init__(self, data: bytes, settings: Settings, manifest: Manifest, keep_photo: bool) -> None:
        # The JPEG decoder may skip detail the graph will not see; the boxes are then scaled from the
        # decoded size to the photo's real (upright) size.
        decoded = decode_for_graph(data, settings.max_image_pixels, manifest.input.color, manifest.input.size, keep_photo)
        self.span = decoded.span
        self.inputs, self.letterbox = detection.preprocess(decoded.image, manifest)
        self.photo = decoded.photo


def class_indices(requested: list[str] | None, labels: list[str]) -> list[int] | None:
    """``classes`` as repeated and/or comma-separated names -> label indices (422 on an unknown name)."""
    if not requested:
        return None
    names = [name.strip() for entry in requested for name in entry.split(",") if name.strip()]
    if not names:
        raise ApiError(422, "invalid_parameter", f"classes: no class name given; this model has {labels}")
    unknown = [name for name in names if name not in labels]
    if unknown:
        raise ApiError(422, "invalid_parameter", f"classes: unknown class(es) {unknown}; this model has {labels}")
    return sorted({labels.index(name) for name in names})


@router.post(
    "/detect",
    response_model=DetectResponse,
    openapi_extra=OPENAPI,
    summary="Detect objects: boxes in original-image pixels with label and score (JSON), or the photo with boxes drawn",
)
async def detect(
    request: Request,
    data: Annotated[bytes, Depends(read_image)],
    model: Annotated[str | None, Query(description="default: OCELLUS_DEFAULT_MODELS, else the first detector")] = None,
    score_threshold: Annotated[
        float | None,
        Query(ge=0.0, le=1.0, allow_inf_nan=False, description="keep scores >= this; default from the manifest"),
        PLAIN_ZERO,
    ] = None,
    iou_threshold: Annotated[
        float | None,
        Query(
            ge=0.0, le=1.0, allow_inf_nan=False, description="NMS: a box overlapping a better one of its class by more is dropped"
        ),
        PLAIN_ZERO,
    ] = None,
    max_detections: Annotated[
        int | None, Query(ge=1, le=MAX_DETECTIONS_LIMIT, description="at most this many, best first")
    ] = None,
    classes: Annotated[
        list[str] | None, Query(description="only these class names (comma-separated or repeated); default: all")
    ] = None,
    format: Annotated[Literal["json", "image"], Query(description="json: detections; image: JPEG with boxes drawn")] = "json",
) -> Response | DetectResponse:
    """Objects in one image: boxes in the photo's own pixels (EXIF orientation applied), each with its label and
    score, best first; `format=image` answers the photo with the boxes drawn (JPEG) instead."""
    settings: Settings = request.app.state.settings
    loaded = request.app.state.repository.get(model, Task.detection)
    manifest = loaded.manifest
    default_score, default_iou, default_limit = detection.manifest_thresholds(manifest)
    score = default_score if score_threshold is None else score_threshold
    iou = default_iou if iou_threshold is None else iou_threshold
    limit = default_limit if max_detections is None else max_detections
    wanted = class_indices(classes, manifest.labels)
    await reserve_pixels(request, data)
    with loaded.batcher.announce():
        prepared = await image_thread(Prepared, data, settings, manifest, format == "image")
    outputs = await run_by_role(loaded, prepared.inputs, settings)

    def postprocess() -> list[dict[str, object]]:
        boxes, scores = outputs["boxes"][0], outputs["scores"][0]
        kept, kept_scores, labels = detection.select(boxes, scores, score, iou, limit, wanted, content=prepared.letterbox)
        mapped = detection.to_original(kept, prepared.letterbox, prepared.span)
        return detection.detections(mapped, kept_scores, labels, manifest.labels)

    found = await image_thread(postprocess)
    if format == "image":
        assert prepared.photo is not None
        body = await image_thread(detection.draw, prepared.photo, found)
        headers = {"X-Model": manifest.name, "X-Model-Version": quote(manifest.version), "X-Detections": str(len(found))}
        return Response(body, media_type="image/jpeg", headers=headers)
    width, height = prepared.span.size
    return DetectResponse(
        model=manifest.name,
        version=manifest.version,
        width=int(width),
        height=int(height),
        score_threshold=score,
        iou_threshold=iou,
        max_detections=limit,
        detections=[Detection.model_validate(d) for d in found],
    )
