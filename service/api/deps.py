"""Request dependencies shared by the routers: API-key roles and image uploads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import File, Request, Security, UploadFile
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from PIL import Image
from pydantic import AfterValidator
from starlette.requests import ClientDisconnect

from service import timing
from service.api.errors import ApiError
from service.budget import PixelBudget
from service.images import keep_opened, load_image, open_image
from service.manifest import Manifest
from service.middleware import API_GRANT, PIXELS, PIXELS_TAKEN, WROTE
from service.repository import LoadedModel
from service.settings import ROLE_RANK, KeyGrant, Role, Settings
from service.workers import image_thread

T = TypeVar("T")
PIXELS_COUNTED = "pixels_counted"  # the ids of the photos whose pixels a request has taken
INLINE_DECODE_BYTES = 8 * 1024
INLINE_DECODE_PIXELS = 256 * 256
INLINE_DECODE_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}  # not TIFF: a tiny one may declare a huge tile
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
JSON_TYPE = "application/json"
WHITESPACE = re.compile(r"\s+")
JSON_BODY = "json_body"  # where the request's state keeps its parsed JSON object


MULTIPART_REQUIRED = "x-multipart-required"  # an operation's parts a multipart form must have (see required_parts)


def body_doc(*files: str) -> dict[str, Any]:
    """OpenAPI: besides the multipart form, the images may come base64 in a JSON object and, for a route that
    takes one image, as the raw request body."""
    text = {"type": "string", "contentEncoding": "base64", "description": "the image file in base64, or a data: URI"}
    as_json = {"type": "object", "properties": dict.fromkeys(files, text), "required": list(files), "additionalProperties": False}
    content: dict[str, Any] = {JSON_TYPE: {"schema": as_json}}
    if len(files) == 1:  # the raw body: any image type, or bytes of no declared type (upload_bytes takes both)
        content |= {kind: {"schema": {"type": "string", "format": "binary"}} for kind in ("image/*", "application/octet-stream")}
    return {"requestBody": {"required": True, "content": content}, MULTIPART_REQUIRED: list(files)}


RAW_BODY_DOC = body_doc("file")


def required_parts(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with each multipart form's file parts required and never null, and no other parts. FastAPI
    declares them optional (``File(None)``), since a raw or JSON body carries the image instead; a form must still have them."""
    components = schema.get("components", {}).get("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            parts = operation.pop(MULTIPART_REQUIRED, None)
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            if parts is None or "$ref" not in form:
                continue
            body = components[form["$ref"].rsplit("/", 1)[-1]]
            for name, part in body["properties"].items():
                options = [option for option in part.pop("anyOf", []) if option != {"type": "null"}]
                if len(options) == 1:  # a part is sent or left out; JSON's null is not a thing in a form
                    part.update(options[0])
                if name in parts:
                    part["format"] = "binary"  # Swagger UI's file picker
            body["required"] = sorted(set(body.get("required", [])) | set(parts))
            body["additionalProperties"] = False  # strict.known_fields_only refuses other parts (422 unknown_parameter)
    return schema


def _without_negative_zero(value: float | None) -> float | None:
    return None if value is None else value + 0.0  # -0.0 + 0.0 is 0.0


# For threshold parameters that are echoed back: a client's -0 answers as 0.
PLAIN_ZERO = AfterValidator(_without_negative_zero)


ROLES_NOTE = (
    "Only when the server has keys (OCELLUS_API_KEYS). Each operation lists the role it needs: infer (inference "
    "and models) < read (also gallery reads and identify) < write (gallery changes) < admin (model reload). "
    "A key may be limited to some galleries: any other gallery's routes answer it 403."
)
# Declared as FastAPI security schemes, so that the OpenAPI document says which operations need a key (and
# Swagger UI at /docs offers its Authorize button); neither refuses a request by itself (auto_error=False).
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", description=ROLES_NOTE, auto_error=False)
BEARER = HTTPBearer(scheme_name="Bearer", description=ROLES_NOTE, auto_error=False)


GALLERY_PARAM = "g"  # the galleries router's path parameter: a key's gallery scope applies to it


def record_write(request: Request, **ids: str) -> None:
    """Name in the access log what a gallery write made (its path names only the gallery, or the subject)."""
    setattr(request.state, WROTE, ids)


def caller_grant(request: Request) -> KeyGrant | None:
    """The grant of the request's API key, recorded by ``RequestContext``; None on an open server."""
    return getattr(request.state, API_GRANT, None)


def key_refusal(request: Request, needed: str | None) -> ApiError | None:
    """The 401 or 403 for a caller whose key may not call an operation that needs role ``needed``, else None.
    On a gallery route the gallery must be one the key may use, too (a 403 whether or not it exists)."""
    if needed is None or not request.app.state.settings.api_key_entries:
        return None
    grant = caller_grant(request)
    if grant is None:  # a keyed route on a path the middleware leaves open: refused, never let through
        message = "send an API key in X-API-Key or Authorization: Bearer"
        return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
    if ROLE_RANK[grant.role] < ROLE_RANK[needed]:
        return ApiError(403, "forbidden", f"this API key has role {grant.role!r}; {needed!r} is needed")
    gallery = request.path_params.get(GALLERY_PARAM)
    if gallery is not None and not grant.may_use(gallery):
        return ApiError(403, "forbidden", f"this API key may not use gallery {gallery[:64]!r}")
    return None


async def _check_key(
    request: Request,
    scopes: SecurityScopes,
    api_key: Annotated[str | None, Security(API_KEY)],  # declared for the OpenAPI document: the middleware reads it
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> None:
    """The key's grant against the route's role. The key itself was checked by ``RequestContext`` before the body
    was read; it left the key's grant in the request's state."""
    refusal = key_refusal(request, max(scopes.scopes, key=ROLE_RANK.__getitem__))
    if refusal is not None:
        raise refusal


ROLE_CHECK = _check_key  # the dependency that carries a route's role (service.api.strict reads it)


def require(role: Role) -> Any:
    """A route dependency: an API key of at least ``role`` when keys are configured (the role is the
    security scope, so the OpenAPI document lists it on the operation)."""
    return Security(_check_key, scopes=[role])


def content_type(request: Request) -> str:
    """The media type without parameters, any ``+json`` type (``application/problem+json``...) as JSON."""
    sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return JSON_TYPE if sent.endswith("+json") or sent == "text/json" else sent


async def upload_bytes(request: Request, upload: UploadFile | None, field: str, raw_body: bool = True) -> bytes:
    """The image bytes of multipart field ``field``, of JSON key ``field`` (base64), or, where ``raw_body``
    (a route that takes one image), of a raw ``image/*`` body."""
    sent = content_type(request)
    if sent == "multipart/form-data":
        if upload is None:
            raise ApiError(
                422,
                "missing_file",
                f"the multipart form has no complete {field!r} part (named otherwise, or the form is cut short?): "
                f"curl -F {field}=@photo.jpg",
            )
        return await upload.read()
    if sent == JSON_TYPE:
        return await json_image(request, field)
    has_body = "content-length" in request.headers or "transfer-encoding" in request.headers  # sized or chunked
    if raw_body and (sent.startswith(RAW_IMAGE_TYPES) or (not sent and has_body)):
        return await request.body()
    if not raw_body and (sent.startswith(RAW_IMAGE_TYPES) or not sent):
        message = (
            f"this operation takes more than one image: send {field!r} as a file part (curl -F {field}=@photo.jpg) "
            "or base64 in a JSON object"
        )
        raise ApiError(422, "missing_file", message)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the image as multipart/form-data field {field!r}, base64 in a JSON object ({{{field!r}: ...}})"
        + (" or as a raw image/* body" if raw_body else "")
        + f", not {sent[:64]!r}",  # a header may be kilobytes long: not echoed whole
    )


MAX_JSON_COLONS = 32  # a few "key": "value" pairs, each value perhaps a data: URI with parameters
JSON_OBJECT_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\{")  # after a UTF-8 byte order mark, which json.loads takes


def no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: a key sent twice is a 422, not the last one silently."""
    seen: set[str] = set()
    for key, _ in pairs:  # one pass (counting each key's copies took minutes for a 2 MB body of keys)
        if key in seen:
            raise ApiError(422, "repeated_parameter", f"JSON key {key[:40]!r} came more than once; send one")
        seen.add(key)
    return dict(pairs)


def parse_json(raw: bytes) -> Any:
    """JSON text -> a value; 400 when it does not parse, 422 ``repeated_parameter`` for a key sent twice."""
    try:
        return json.loads(raw, object_pairs_hook=no_repeated_keys)
    except (ValueError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
        raise ApiError(400, "bad_request", f"the JSON body does not parse: {str(error)[:200]}") from None


async def small_json_object(request: Request, max_bytes: int, shape: str) -> dict[str, Any]:
    """A small JSON object body (no image in it), read as ``json_body`` reads one but without its guard against
    nesting, which counts a "[" inside a string too: 415 for another content type, 413 past ``max_bytes``, 422 for
    anything but an object (``shape`` says what to send)."""
    if content_type(request) != JSON_TYPE:
        raise ApiError(415, "unsupported_media_type", f"send a JSON object: {shape}")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise ApiError(413, "payload_too_large", f"this JSON body is at most {max_bytes:,} bytes")
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_parameter", f"send a JSON object: {shape}")
    return value


async def json_body(request: Request, images: Sequence[str] = ("file",)) -> dict[str, Any]:
    """The request's JSON object, parsed once (in a worker thread when large: 25 MB of JSON takes ~100 ms).
    ``images``: the route's image keys, which the refusals show (verify's are image_a and image_b)."""
    parsed: dict[str, Any] | None = getattr(request.state, JSON_BODY, None)
    if parsed is not None:
        return parsed
    raw = await request.body()
    example = "{" + ", ".join(f'"{name}": "<base64>"' for name in images) + "}"
    if not JSON_OBJECT_START.match(raw):  # (a photo sent as JSON was refused as nested or unparsable by chance of its bytes)
        raise ApiError(422, "invalid_parameter", f"the JSON body must be an object, such as {example}")
    # One flat object of a few strings is all an image body holds; anything else is refused before parsing, since
    # 25 MB of nested empty lists would take 700 MB and seconds to parse (memchr-fast counts, no parse).
    if raw.count(b"{") > 1 or b"[" in raw:
        raise ApiError(422, "invalid_parameter", f"the JSON body holds nested objects or lists: send {example}")
    if raw.count(b":") > MAX_JSON_COLONS:
        raise ApiError(422, "invalid_parameter", f"the JSON body holds too many keys: send {example}")

    value = await image_thread(parse_json, raw) if len(raw) > INLINE_DECODE_BYTES else parse_json(raw)
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_parameter", f"the JSON body must be an object, such as {example}")
    setattr(request.state, JSON_BODY, value)
    return value


async def json_image(request: Request, field: str) -> bytes:
    body = await json_body(request, (field,))
    if body.get(field) is None:
        raise ApiError(422, "missing_file", f"the JSON object has no {field!r} image (the image file as a base64 string)")
    value = body.pop(field)  # its text is not kept beside the decoded bytes
    if not isinstance(value, str):
        raise ApiError(422, "invalid_parameter", f"{field}: the image file as a base64 string, not {type(value).__name__}")
    return await image_thread(decode_base64, value, field) if len(value) > INLINE_DECODE_BYTES else decode_base64(value, field)


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64, padded or not, with or without line breaks, or a ``data:...;base64,`` URI."""
    text = text.lstrip()
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ApiError(400, "invalid_base64", f"{field}: a data: URI must be base64 (data:image/jpeg;base64,...)")
    if any(space in text for space in " \n\r\t\f\v"):  # MIME base64 breaks its lines (memchr: a regex search took 0.27 s)
        text = WHITESPACE.sub("", text)
    url_safe = "-" in text or "_" in text
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if url_safe else None, validate=True)
    except (binascii.Error, ValueError) as error:  # ValueError: characters outside ASCII
        raise ApiError(400, "invalid_base64", f"{field}: not base64 ({error})") from None


async def read_image(request: Request, file: Annotated[UploadFile | None, File(description="the image")] = None) -> bytes:
    return await upload_bytes(request, file, "file")


async def reserve_pixels(request: Request, *photos: bytes | Image.Image) -> None:
    """Take the photos' pixels from the process's budget (``service.budget``) before they are decoded: after the route's
    own checks (a request refused anyway must not wait for them), and all of a request's at once (one holding a photo's
    while it waited for another's could wait on others doing the same); a photo's bytes are counted once however often
    this is called. 503 after OCELLUS_REQUEST_TIMEOUT_S; 499 when the client hangs up meanwhile. They are given back
    once the answer has been sent (RequestContext)."""
    budget = getattr(request.state, PIXELS, None)
    if budget is None:  # an app without RequestContext (unit tests of routes)
        return
    settings: Settings = request.app.state.settings
    counted: set[int] | None = getattr(request.state, PIXELS_COUNTED, None)
    if counted is None:
        counted = set()
        setattr(request.state, PIXELS_COUNTED, counted)
    pixels = 0
    for photo in photos:
        if id(photo) in counted:
            continue
        counted.add(id(photo))  # (the bytes live as long as the request that counted them)
        if isinstance(photo, Image.Image):
            pixels += photo.width * photo.height
            continue
        try:  # a large file's header in a thread (see prepare); the decoding takes the result (keep_opened)
            if len(photo) > INLINE_DECODE_BYTES:
                opened = await image_thread(open_image, photo, settings.max_image_pixels)
            else:
                opened = open_image(photo, settings.max_image_pixels)
        except ApiError:  # no image: the route answers it when it decodes
            continue
        keep_opened(photo, opened)
        pixels += opened.width * opened.height
    if budget.fits(pixels):
        taken = await budget.take(pixels, settings.request_timeout_s)
    else:
        with timing.timed("queue"):  # waiting for other requests' photos, as for their model runs
            taken = await _unless_hung_up(request, budget.take(pixels, settings.request_timeout_s), budget)
    setattr(request.state, PIXELS_TAKEN, getattr(request.state, PIXELS_TAKEN, 0) + taken)


async def _unless_hung_up(request: Request, taking: Coroutine[Any, Any, int], budget: PixelBudget) -> int:
    """``taking``'s pixels; a client gone meanwhile (its body is read: the next message says so) gives up its place,
    which it held at the head of the queue for nobody, and its run."""
    take = asyncio.ensure_future(taking)
    gone = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not take.done():
            take.cancel()  # (take gives back pixels granted as it was cancelled)
            await asyncio.gather(take, return_exceptions=True)
    if take.cancelled():
        raise ClientDisconnect
    if isinstance(take.exception(), TimeoutError):
        message = (
            f"photos of {budget.total - budget.free:,} pixels are being worked on, the most this server takes at once "
            f"(OCELLUS_MAX_PIXELS_IN_FLIGHT, {budget.total:,}); retry shortly"
        )
        raise ApiError(503, "overloaded", message, {"Retry-After": "1"})
    return take.result()


async def _hang_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    with timing.timed("image"):
        image = open_image(data, settings.max_image_pixels)
        if image.format in INLINE_DECODE_FORMATS and image.width * image.height <= INLINE_DECODE_PIXELS:
            return work(image)
    return await image_thread(work, image)


async def all_or_none(*steps: Awaitable[Any]) -> list[Any]:
    """Every step's result, as asyncio.gather gives them; but when one fails, the others are cancelled and waited for
    before the error goes on (gather left them running: a photo decoded, a model run, after the answer had gone, its
    pixels given back and its model perhaps retired)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_model(model: LoadedModel, inputs: np.ndarray, settings: Settings, finite: bool = True) -> list[np.ndarray]:
    """Through the model's micro-batcher, bounded by the request timeout; more samples than the model's
    ``max_batch_size`` (a photo's many faces) go as several submissions, so no run exceeds it.

    With ``finite``, a NaN or infinity in a float output is a 500 ``inference_failed`` (the model's fault, not the
    upload's): JSON cannot carry one, and a face embedding of NaN must never reach a gallery."""
    most = model.serving.max_batch_size
    if len(inputs) > most:
        parts = await all_or_none(
            *(run_model(model, inputs[i : i + most], settings, finite) for i in range(0, len(inputs), most))
        )
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]
    try:
        # submit() queues synchronously: wait_for(coroutine) would start it in a new task a loop turn
        # later, a gap in which the request is neither announced nor queued and a reload can retire its model.
        outputs = await asyncio.wait_for(model.batcher.submit(inputs), settings.request_timeout_s)
    except TimeoutError:
        raise ApiError(
            503, "timeout", f"inference took longer than {settings.request_timeout_s:g} s", headers={"Retry-After": "1"}
        ) from None
    if finite and not all(np.isfinite(output).all() for output in outputs if output.dtype.kind == "f"):
        raise ApiError(500, "inference_failed", f"model {model.name!r} answered NaN or infinite values for this input")
    return outputs


async def run_by_role(model: LoadedModel, inputs: np.ndarray, settings: Settings) -> dict[str, np.ndarray]:
    """A detector's ``run_model`` outputs by their manifest role (``boxes``, ``scores``...): the graph's output order,
    and the manifest's key order, are nobody's contract. Non-finite values pass: ``detection.select`` drops the
    candidates that hold one (a decoded box of a far-off anchor may overflow while the photo's faces are fine)."""
    outputs = await run_model(model, inputs, settings, finite=False)
    return dict(zip(model.manifest.outputs, outputs, strict=True))
