"""``POST /v1/segment``: a per-pixel label map, as a PNG, as JSON with COCO RLE masks, or as an overlay.

The label map always has exactly the uploaded image's size (after EXIF orientation): the
photo runs through the graph with its longer side at most the model's ``defaults.max_side`` and the
logits are resized back before the argmax (see ``service/tasks/segmentation.py``).
"""

from __future__ import annotations

import io
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.deps import RAW_BODY_DOC, read_image, require, reserve_pixels, run_model
from service.api.errors import ApiError
from service.api.schemas import ERROR_RESPONSES, model_headers
from service.images import decode_for_graph
from service.manifest import Manifest, Task
from service.settings import Settings
from service.tasks import segmentation
from service.workers import image_thread

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES, dependencies=[require("infer")])


class RleMask(BaseModel):
    size: list[int]  # [height, width]
    counts: str | list[int]  # COCO compressed string, or the run lengths


class SegmentClass(BaseModel):
    label: str
    index: int
    pixels: int
    fraction: float
    mask: RleMask | None  # column-major COCO RLE; null when the class covers no pixel


class SegmentResponse(BaseModel):
    model: str
    version: str
    width: int
    height: int
    labels: list[str]
    classes: list[SegmentClass]


OPENAPI = {
    **RAW_BODY_DOC,
    "responses": {
        "200": {
            "description": "png: palette PNG, pixel value = class index; overlay: JPEG; json: areas and masks",
            "content": {"image/png": {}, "image/jpeg": {}},
            "headers": model_headers(**{"X-Labels": "the class names in index order, comma-separated and percent-encoded"}),
        }
    },
}


class Prepared:
    """One decoded request: the graph's input, the sizes to map back to, and the photo for overlays."""

    def __init__(self, data: bytes, settings: Settings, manifest: Manifest, keep_photo: bool) -> None:
        max_side = manifest.defaults.get("max_side")
        # The JPEG decoder can skip detail the graph will not see.
        draft = (int(max_side), int(max_side)) if max_side else None
        decoded = decode_for_graph(data, settings.max_image_pixels, manifest.input.color, draft, keep_photo)
        self.span = decoded.span
        width, height = segmentation.model_size(*decoded.image.size, max_side)
        self.model_hw = (height, width)
        self.inputs = segmentation.preprocess(decoded.image, manifest)
        self.photo = decoded.photo


@router.post(
    "/segment",
    response_model=SegmentResponse,
    openapi_extra=OPENAPI,
    summary="Segment an image: a label map of the input's size (PNG), per-class areas and COCO RLE masks (JSON), or an overlay",
)
async def segment(
    request: Request,
    data: Annotated[bytes, Depends(read_image)],
    model: Annotated[str | None, Query(description="default: OCELLUS_DEFAULT_MODELS, else the first segmenter")] = None,
    format: Annotated[
        Literal["png", "json", "overlay"],
        Query(description="png: label map (pixel value = class index); json: areas + COCO RLE; overlay: the photo tinted"),
    ] = "png",
    rle: Annotated[
        Literal["compressed", "counts"], Query(description="json: COCO compressed string or the list of run lengths")
    ] = "compressed",
    opacity: Annotated[
        float, Query(ge=0.0, le=1.0, allow_inf_nan=False, description="overlay: how strongly classes tint the photo")
    ] = 0.5,
) -> Response | SegmentResponse:
    """A class for every pixel: `format=png` a label map of the input's size (pixel value = class index), `json` each
    class's share of the pixels and COCO RLE masks, `overlay` the photo with the mask blended in (JPEG)."""
    for name, applies_to in (("rle", "json"), ("opacity", "overlay")):
        if name in request.query_params and format != applies_to:  # else ignored without a word
            raise ApiError(422, "invalid_parameter", f"{name} applies to format={applies_to} only, not format={format}")
    settings: Settings = request.app.state.settings
    loaded = request.app.state.repository.get(model, Task.segmentation)
    manifest = loaded.manifest
    await reserve_pixels(request, data)
    with loaded.batcher.announce():
        prepared = await image_thread(Prepared, data, settings, manifest, format == "overlay")
    (logits,) = await run_model(loaded, prepared.inputs, settings)
    labels = await image_thread(segmentation.labels_from_logits, logits[0], prepared.model_hw, prepared.span)
    # Each name percent-encoded, then joined: header values must be latin-1 (names from a user's labels.txt need not
    # be), and a comma in a name ("person, adult") split it in two.
    labels_header = ",".join(quote(label, safe="") for label in manifest.labels)
    headers = {"X-Model": manifest.name, "X-Model-Version": quote(manifest.version), "X-Labels": labels_header}

    if format == "png":
        body = await image_thread(segmentation.palette_png, labels)
        return Response(body, media_type="image/png", headers=headers)
    if format == "overlay":

        def blend() -> bytes:
            assert prepared.photo is not None
            buffer = io.BytesIO()
            segmentation.overlay(prepared.photo, labels, opacity).save(buffer, format="JPEG", quality=90)
            return buffer.getvalue()

        return Response(await image_thread(blend), media_type="image/jpeg", headers=headers)

    def describe() -> SegmentResponse:
        height, width = labels.shape
        pixels = segmentation.class_pixels(labels, len(manifest.labels))
        classes = [
            SegmentClass(
                label=name,
                index=index,
                pixels=int(pixels[index]),
                fraction=float(pixels[index] / labels.size),
                mask=RleMask(**segmentation.rle_encode(labels == index, rle == "compressed")) if pixels[index] else None,
            )
            for index, name in enumerate(manifest.labels)
        ]
        return SegmentResponse(
            model=manifest.name, version=manifest.version, width=width, height=height, labels=manifest.labels, classes=classes
        )

    return await image_thread(describe)
