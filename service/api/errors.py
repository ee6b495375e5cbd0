"""One error shape for every failure: ``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

log = logging.getLogger("ocellus")
ERROR_CODE_HEADER = "X-Error-Code"

# Every code an answer can carry, with its status and meaning: the README's table and the OpenAPI document are
# made from (or checked against) this, and a test fails when the service uses a code missing here.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "a malformed request (on /v2: its JSON body)"),
    "empty_image": (400, "the image has no bytes"),
    "corrupt_image": (400, "the image is truncated or damaged"),
    "invalid_base64": (400, "an image in a JSON body is not base64 (nor a base64 data: URI)"),
    "wrong_task": (400, "the named model does another task than this route"),
    "bad_shape": (400, "/v2: the tensor's shape or size does not fit the model's input"),
    "unauthorized": (401, "no API key, or an unknown one (keys are set)"),
    "forbidden": (403, "the API key's role is below the route's, or the key may not use this gallery"),
    "not_found": (404, "no such route"),
    "unknown_model": (404, "no model by that name"),
    "unknown_version": (404, "/v2: no such model version"),
    "unknown_gallery": (404, "the gallery has no subjects (names are case-sensitive)"),
    "unknown_subject": (404, "no such subject in the gallery"),
    "unknown_face": (404, "no such face in the gallery"),
    "no_photo": (404, "no photo was kept with the face (OCELLUS_GALLERY_KEEP_PHOTOS was off)"),
    "method_not_allowed": (405, "the route does not take this HTTP method"),
    "body_timeout": (408, "the request body did not arrive within OCELLUS_BODY_TIMEOUT_S"),
    "duplicate_name": (409, "the gallery has a subject by that name"),
    "duplicate_face": (409, "the subject has this face already: the same photo, added again"),
    "already_enrolled": (409, "reject_duplicates: the face matches an enrolled subject (the message names them)"),
    "no_faces": (409, "the subject has no enrolled faces left"),
    "no_comparable_faces": (
        409,
        "the faces were made by another face model (re-embed them), or are not this model's (a damaged store)",
    ),
    "model_mismatch": (409, "embeddings sent were made by another version of the face model: embed the photos again"),
    "models_dir_missing": (409, "reload refused: the models folder is missing (the loaded models keep serving)"),
    "models_dir_unreadable": (409, "reload refused: the service may not list the models folder (the loaded models keep serving)"),
    "payload_too_large": (413, "the upload exceeds OCELLUS_MAX_UPLOAD_BYTES (identify/embeddings: 2 MiB)"),
    "image_too_large": (413, "the image has more pixels than OCELLUS_MAX_IMAGE_PIXELS (a decompression bomb)"),
    "image_too_complex": (
        413,
        "the image's encoding would take too long to read (a JPEG of too many scans, a PNG of too many chunks, a huge EXIF)",
    ),
    "unsupported_media_type": (415, "the body is not an image, a multipart form or a JSON object"),
    "unsupported_image": (415, "an image format the service does not read"),
    "invalid_parameter": (422, "a parameter is out of range or malformed"),
    "unknown_parameter": (422, "a query parameter, form field or JSON key the operation does not take"),
    "repeated_parameter": (422, "a single-valued parameter or form field (such as file) came twice"),
    "missing_file": (422, "the multipart form (or JSON object) has no image of the expected name"),
    "no_face": (422, "no face was found in the photo"),
    "several_faces": (422, "the photo shows several faces where one is needed (single_face)"),
    "face_too_small": (422, "the face to enroll is smaller than min_face_size (OCELLUS_GALLERY_MIN_FACE_PX)"),
    "client_closed": (499, "the client closed the connection before its upload ended (logged, never read)"),
    "internal_error": (500, "a bug: the server failed to handle the request (logged with a traceback)"),
    "inference_failed": (500, "ONNX Runtime failed on the model, or the model answered NaN or infinity"),
    "unsupported_datatype": (
        501,
        "/v2: a model output whose datatype the protocol cannot send (an input's wrong datatype is a 400 bad_request)",
    ),
    "no_model": (503, "no model of this task is loaded"),
    "not_ready": (503, "/readyz, /v2/health/ready: no model is loaded (the body is the readiness document)"),
    "model_unavailable": (503, "the model failed to load (see /readyz)"),
    "model_unloaded": (503, "a reload retired the model mid-request: retry"),
    "no_face_detector": (503, "no loaded face detector for the face model"),
    "no_mask_detector": (503, "mask=true, but no detector with with_mask/without_mask labels is loaded"),
    "gallery_unavailable": (503, "the gallery store does not answer (or is busy): retry"),
    "overloaded": (503, "too many requests are waiting: retry after Retry-After"),
    "timeout": (503, "inference took longer than OCELLUS_REQUEST_TIMEOUT_S: retry"),
    "shutting_down": (503, "the server is stopping: retry on another replica"),
}

STATUS_CODES = {  # the code of an HTTPException raised without one (by Starlette or FastAPI themselves)
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
}


class ApiError(HTTPException):
    """An expected failure with a stable machine-readable ``code``."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    # The Open Inference Protocol (/v2) defines its own error body: {"error": "message"}; the code then
    # travels only in the X-Error-Code header (which metrics and access logs read for every error).
    is_v2 = path == "/v2" or path.startswith("/v2/")
    body = {"error": message} if is_v2 else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), ERROR_CODE_HEADER: code})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a form whose client hung up mid-upload
        return error_response(499, "client_closed", "the client closed the connection before its upload ended")
    code = getattr(exc, "code", None) or STATUS_CODES.get(
        exc.status_code, "internal_error" if exc.status_code >= 500 else "bad_request"
    )
    message, path = str(exc.detail), request.url.path
    if code == "not_found" and path.endswith("/") and _has_route(request, path.rstrip("/")):  # slashes are not redirected
        message = f"no route {path}; use {path.rstrip('/')} without the trailing slash"
    headers = getattr(exc, "headers", None)
    # Starlette names the first route's methods only. Under a mount (/docs/static) no route matches: its own header
    # stands, as an ApiError's does (GET /v1/models/reload: /v1/models/{name} matches the path, yet only POST is taken).
    if exc.status_code == 405 and not isinstance(exc, ApiError) and (allowed := _allowed_methods(request)):
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return error_response(exc.status_code, code, message, headers, path)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path, HEAD with GET (``middleware.HeadAsGet``)."""
    routes = request.app.router.routes
    methods = {
        method
        for method in ("DELETE", "GET", "PATCH", "POST", "PUT")
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    }
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))


def _has_route(request: Request, path: str) -> bool:
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    code = "invalid_parameter"
    files = _file_fields(request)
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body", "path", "header"))
        message = str(error.get("msg"))
        if where in files:  # the same code as every other route's missing image, and what to send instead
            code = "missing_file"
            if error.get("type") == "missing":
                message = f"required, as a file part of a multipart/form-data form (curl -F {where}=@photo.jpg)"
            else:  # a part without a filename reaches FastAPI as text
                message = f"send it as a file, with a filename (curl -F {where}=@photo.jpg), not as a text field"
        problems.append(f"{where}: {message}" if where else message)
    return error_response(422, code, "; ".join(problems) or "invalid request", path=request.url.path)


def _file_fields(request: Request) -> frozenset[str]:
    """The names of the matched route's file parameters (those that only a multipart form can carry)."""
    from service.api.strict import declared  # (strict raises ApiError: imported here, not at the top)

    route = request.scope.get("route")
    return declared(route).files if isinstance(route, APIRoute) else frozenset()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    from service.middleware import logged_path  # (the middleware imports this module)

    log.exception("unhandled error on %s %s", request.method, logged_path(request.url.path))
    return error_response(500, "internal_error", "the server failed to handle this request", path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler's exception as any Exception; each of these only ever gets its own class.
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
