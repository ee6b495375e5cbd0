"""Request dependencies shared by the routers: API-key roles and image uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import File, Request, Security, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from PIL import Image
from pydantic import AfterValidator

from service.api.errors import ApiError
from service.images import load_image, open_image
from service.manifest import Manifest
from service.middleware import API_ROLE
from service.repository import LoadedModel
from service.settings import ROLE_RANK, Role, Settings
from service.workers import image_thread

T = TypeVar("T")
INLINE_DECODE_BYTES = 8 * 1024
INLINE_DECODE_PIXELS = 256 * 256
INLINE_DECODE_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}  # not TIFF: a tiny one may declare a huge tile
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")

# OpenAPI: the image may also come as the raw request body.
RAW_BODY_DOC: dict[str, Any] = {"requestBody": {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}}


def _without_negative_zero(value: float | None) -> float | None:
    return None if value is None else value + 0.0  # -0.0 + 0.0 is 0.0


# For threshold parameters that are echoed back: a client's -0 answers as 0.
PLAIN_ZERO = AfterValidator(_without_negative_zero)


ROLES_NOTE = (
    "Only when the server has keys (OCELLUS_API_KEYS). Each operation lists the role it needs: read (inference, "
    "models, gallery reads) < write (gallery changes) < admin (model reload)."
)
# Declared as FastAPI security schemes, so that the OpenAPI document says which operations need a key (and
# Swagger UI at /docs offers its Authorize button); neither refuses a request by itself (auto_error=False).
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", description=ROLES_NOTE, auto_error=False)
BEARER = HTTPBearer(scheme_name="Bearer", description=ROLES_NOTE, auto_error=False)


async def _check_key(
    request: Request,
    scopes: SecurityScopes,
    api_key: Annotated[str | None, Security(API_KEY)],  # declared for the OpenAPI document: the middleware reads it
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> None:
    """The key's role against the route's. The key itself was checked by ``RequestContext`` before the body was
    read; it left the key's role in the request's state."""
    if not request.app.state.settings.key_roles:
        return
    granted = getattr(request.state, API_ROLE, None)
    if granted is None:  # a keyed route on a path the middleware leaves open: refused, never let through
        message = "send an API key in X-API-Key or Authorization: Bearer"
        raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
    needed = max(scopes.scopes, key=ROLE_RANK.__getitem__)
    if ROLE_RANK[granted] < ROLE_RANK[needed]:
        raise ApiError(403, "forbidden", f"this API key has role {granted!r}; {needed!r} is needed")


ROLE_CHECK = _check_key  # the dependency that carries a route's role (service.api.strict reads it)


def require(role: Role) -> Any:
    """A route dependency: an API key of at least ``role`` when keys are configured (the role is the
    security scope, so the OpenAPI document lists it on the operation)."""
    return Security(_check_key, scopes=[role])


async def upload_bytes(request: Request, upload: UploadFile | None, field: str) -> bytes:
    """The image bytes of multipart field ``field``, or of a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        if upload is None:
            raise ApiError(
                422,
                "missing_file",
                f"the multipart form has no complete {field!r} part (named otherwise, or the form is cut short?)",
            )
        return await upload.read()
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers  # sized or chunked
    if content_type.startswith(RAW_IMAGE_TYPES) or (not content_type and has_body):
        return await request.body()
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the image as multipart/form-data field {field!r} or as a raw image/* body, not {content_type!r}",
    )


async def read_image(request: Request, file: Annotated[UploadFile | None, File(description="the image")] = None) -> bytes:
    return await upload_bytes(request, file, "file")


async def prepare(data: bytes, settings: Settings, manifest: Manifest, transform: Callable[[Image.Image, Manifest], T]) -> T:
    """Read the header, decode and pre-process in a worker thread (Pillow and numpy release the GIL).

    Thumbnails (at most ``INLINE_DECODE_BYTES`` and ``INLINE_DECODE_PIXELS``, read from the header, in
    a format whose header bounds the decoding work) are handled on the event loop: decoding one takes
    less time than handing it to a thread and back. Anything larger, even its header, is read in a
    thread: Pillow parses headers in Python, and 24 MB of empty PNG chunks took 10 s.
    """

    def work(image: Image.Image) -> T:
        return transform(load_image(image, manifest.input.color, draft_size=manifest.input.size), manifest)

    if len(data) > INLINE_DECODE_BYTES:
        return await image_thread(lambda: work(open_image(data, settings.max_image_pixels)))
    image = open_image(data, settings.max_image_pixels)
    if image.format in INLINE_DECODE_FORMATS and image.width * image.height <= INLINE_DECODE_PIXELS:
        return work(image)
    return await image_thread(work, image)


async def run_model(model: LoadedModel, inputs: np.ndarray, settings: Settings) -> list[np.ndarray]:
    """Through the model's micro-batcher, bounded by the request timeout."""
    try:
        # submit() queues synchronously: wait_for(coroutine) would start it in a new task a loop turn
        # later, a gap in which the request is neither announced nor queued and a reload can retire its model.
        return await asyncio.wait_for(model.batcher.submit(inputs), settings.request_timeout_s)
    except TimeoutError:
        raise ApiError(
            503, "timeout", f"inference took longer than {settings.request_timeout_s:g} s", headers={"Retry-After": "1"}
        ) from None


async def run_by_role(model: LoadedModel, inputs: np.ndarray, settings: Settings) -> dict[str, np.ndarray]:
    """``run_model``'s outputs by their manifest role (``boxes``, ``scores``...): the graph's output order,
    and the manifest's key order, are nobody's contract."""
    outputs = await run_model(model, inputs, settings)
    return dict(zip(model.manifest.outputs, outputs, strict=True))
