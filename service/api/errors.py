"""One error shape for every failure: ``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

log = logging.getLogger("ocellus")
ERROR_CODE_HEADER = "X-Error-Code"

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    504: "timeout",
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
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
    message, path = str(exc.detail), request.url.path
    if code == "not_found" and path.endswith("/") and _has_route(request, path.rstrip("/")):  # slashes are not redirected
        message = f"no route {path}; use {path.rstrip('/')} without the trailing slash"
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None), path)


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


def _file_fields(request: Request) -> set[str]:
    """The names of the matched route's file parameters (those that only a multipart form can carry)."""
    names: set[str] = set()
    pending = [getattr(request.scope.get("route"), "dependant", None)]
    while pending:  # the route's own parameters and those of its dependencies (such as read_image's file)
        dependant = pending.pop()
        if dependant is not None:
            names |= {field.alias for field in dependant.body_params if isinstance(field.field_info, params.File)}
            pending += dependant.dependencies
    return names


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed to handle this request", path=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler's exception as any Exception; each of these only ever gets its own class.
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
