"""Inference endpoints, one per task; pre/post-processing lives in ``service/tasks/``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from service.api.deps import RAW_BODY_DOC, prepare, read_image, require, reserve_pixels, run_model
from service.api.errors import ApiError
from service.api.schemas import ERROR_RESPONSES, ClassifyResponse
from service.manifest import Task
from service.settings import Settings
from service.tasks import classification

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES, dependencies=[require("infer")])

ModelName = Annotated[str | None, Query(description="model name; default: OCELLUS_DEFAULT_MODELS, else the first classifier")]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=RAW_BODY_DOC,
    summary="Classify an image: the top-k labels with probabilities",
)
async def classify(
    request: Request,
    data: Annotated[bytes, Depends(read_image)],
    model: ModelName = None,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="how many classes; default from the manifest")] = None,
) -> ClassifyResponse:
    """The top-k labels of one image with their softmax probabilities, best first. Send the image as a multipart
    `file`, as the raw body (`Content-Type: image/...`) or base64 in JSON (`{"file": "..."}`); without `model`, the
    task's default model answers."""
    settings: Settings = request.app.state.settings
    loaded = request.app.state.repository.get(model, Task.classification)
    manifest = loaded.manifest
    k = top_k or min(int(manifest.defaults.get("top_k", 5)), len(manifest.labels))
    if k > len(manifest.labels):
        raise ApiError(422, "invalid_parameter", f"top_k must be at most {len(manifest.labels)} for {manifest.name}")
    await reserve_pixels(request, data)
    with loaded.batcher.announce():
        inputs = await prepare(data, settings, manifest, classification.preprocess)
    (logits,) = await run_model(loaded, inputs, settings)
    return ClassifyResponse(
        model=manifest.name, version=manifest.version, predictions=classification.top_k(logits[0], manifest.labels, k)
    )
