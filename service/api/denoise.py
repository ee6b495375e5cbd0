"""``POST /v1/denoise``: the denoised image as a lossless PNG of exactly the upload's size.

Grayscale uploads come back as 8-bit grayscale PNGs, everything else as RGB (alpha is flattened
onto white, EXIF orientation applied, as for every endpoint). Photos larger than the model's
tile are processed in overlapping tiles, a few at a time, so memory stays bounded for any size
the pixel limit allows (see ``service/tasks/denoising.py``); ``tile`` and ``overlap`` override
the manifest's defaults for one request.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from PIL import Image
from starlette.requests import ClientDisconnect

from service.api.deps import RAW_BODY_DOC, read_image, require, reserve_pixels, run_model
from service.api.errors import ApiError
from service.api.schemas import ERROR_RESPONSES, model_headers
from service.images import load_image, open_image, to_array
from service.manifest import MAX_TILE, Manifest, Task
from service.settings import Settings
from service.tasks import denoising
from service.workers import image_thread

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES, dependencies=[require("infer")])

OPENAPI = {
    **RAW_BODY_DOC,
    "responses": {
        "200": {
            "description": "the denoised image, PNG, the upload's size and colour",
            "content": {"image/png": {}},
            "headers": model_headers(**{"X-Tiles": "how many tiles the image was denoised in"}),
        }
    },
}


def open_upload(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The upload behind open_image's header guards, read once (a 25 MB JPEG of empty segments took seconds to walk
    unguarded), and the colour the answer keeps. A palette is read by decoding the image (Pillow's getpalette)."""
    opened = open_image(data, max_pixels)
    try:
        gray = denoising.is_grayscale(opened)
    except Exception as error:  # a truncated palette PNG or GIF
        raise ApiError(400, "corrupt_image", f"the image data is corrupt or truncated: {error}") from None
    return opened, "GRAY" if gray else "RGB"


def prepare(opened: Image.Image, color: str, manifest: Manifest, tile: int | None, overlap: int | None) -> denoising.Tiler:
    return denoising.Tiler(to_array(load_image(opened, color)), manifest, tile, overlap)


@router.post(
    "/denoise",
    openapi_extra=OPENAPI,
    response_class=Response,
    summary="Denoise an image: a lossless PNG of the same size (large photos are tiled with overlap)",
)
async def denoise(
    request: Request,
    data: Annotated[bytes, Depends(read_image)],
    model: Annotated[
        str | None,
        Query(description="model name; default: OCELLUS_DEFAULT_MODELS, else the first loaded denoiser of the upload's colour"),
    ] = None,
    tile: Annotated[
        int | None,
        Query(
            ge=32,
            le=MAX_TILE,
            description="tile size in pixels (default: the model's); rounded up to its stride. Memory per request "
            "stays bounded at any tile: larger tiles run fewer at a time",
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_TILE // 3,
            description="context kept around each tile's core, at most a third of the tile (default: the model's, "
            "or a third of a small tile)",
        ),
    ] = None,
) -> Response:
    """The image without its noise, as a lossless PNG of exactly the input's size, gray or colour as uploaded; a
    large photo is processed in overlapping tiles, so memory stays bounded."""
    settings: Settings = request.app.state.settings
    repository = request.app.state.repository
    if model is not None:  # a named model's errors (404, 503, wrong task) come first, as on the other routes
        repository.get(model, Task.denoising)
    opened, color = await image_thread(open_upload, data, settings.max_image_pixels)  # the answer keeps this colour
    loaded = repository.get(model, Task.denoising, color)
    manifest = loaded.manifest
    tile_px, _, stride = denoising.tile_settings(manifest, tile, overlap)
    # Thinner cores multiply the work: a tile of 64 with 32 kept per side ran 200x the pixels.
    if overlap is not None and 3 * denoising.round_up(overlap, stride) > tile_px:
        largest = tile_px // 3 // stride * stride
        larger_tile = " (or a larger tile)" if tile_px < MAX_TILE else ""  # (341 at tile=1024 had no way out)
        raise ApiError(
            422,
            "invalid_parameter",
            f"overlap={overlap} ({denoising.round_up(overlap, stride)} px per side, a multiple of the model's stride "
            f"{stride}) must be at most a third of the tile ({tile_px} px): pass overlap={largest} at most{larger_tile}",
        )
    await reserve_pixels(request, opened)
    with loaded.batcher.in_use():  # a reload retires this model only after the last tile
        with loaded.batcher.announce():
            tiler = await image_thread(prepare, opened, color, manifest, tile, overlap)
        # Cut, run and stitch a few tiles at a time: only those exist as float32.
        batches = tiler.batches()
        while (batch := await image_thread(next, batches, None)) is not None:
            if await request.is_disconnected():  # nobody will read the answer: free the cores for those who will
                raise ClientDisconnect
            group, inputs = batch
            (outputs,) = await run_model(loaded, inputs, settings)
            await image_thread(tiler.stitch, group, outputs)
    body = await image_thread(denoising.encode_png, tiler.output)
    headers = {"X-Model": manifest.name, "X-Model-Version": quote(manifest.version), "X-Tiles": str(len(tiler.windows))}
    return Response(body, media_type="image/png", headers=headers)
