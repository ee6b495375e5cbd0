"""ASGI middleware: request ids, access metrics and logs, and the request body size limit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, timing
from service.api.errors import ERROR_CODE_HEADER, ApiError, error_response
from service.budget import PixelBudget
from service.metrics import Metrics
from service.settings import KeyGrant

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
log = logging.getLogger("ocellus.access")
SAFE_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,64}")  # printable ASCII, no spaces or control characters
ERROR_CODE = ERROR_CODE_HEADER.lower().encode()


# Paths that need no key (probes, metrics, the API's documentation); every other one needs a known key
# before its body is read (the routes then check the key's role).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/v2/health/", "/docs/")


API_GRANT = "api_grant"  # where the request's state holds its key's grant (role, label, galleries)
WROTE = "wrote"  # and the ids a gallery write made, for the access log (``deps.record_write``)
PIXELS = "pixels"  # and the process's PixelBudget (``deps.reserve_pixels``)
PIXELS_TAKEN = "pixels_taken"  # and the pixels the request took from it, given back when it ends


QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
DOCS_FILES = "/docs/static"  # Swagger UI's and ReDoc's scripts (a mount, not a route)


LOGGED_PATH_CHARS = 2048


def logged_path(path: str) -> str:
    """A request's path for the log, cut at 2,048 characters: uvicorn takes paths of up to ~100 kB, and each
    was written whole into a log line (an easy way to fill an operator's disk)."""
    if len(path) <= LOGGED_PATH_CHARS:
        return path
    return f"{path[:LOGGED_PATH_CHARS]}... ({len(path) - LOGGED_PATH_CHARS:,} more characters)"


class HeadAsGet:
    """HEAD wherever GET is (RFC 9110; FastAPI routes take only the methods they declare): the GET runs and its
    headers, Content-Length included, go out without its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            await send({**message, "body": b""} if message["type"] == "http.response.body" else message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:  # what routing learnt (the route: the metrics' label), with the method left HEAD
            scope.update({key: value for key, value in as_get.items() if key != "method"})


def _route_label(scope: Scope, status: int, refused: bool = False, preflight: bool = False) -> str:
    """The route template for metrics (``/v1/galleries/{g}/subjects``): bounded label values, never raw paths.
    ``refused``: answered before routing (401 without a known key, 503 over the in-progress cap), "refused";
    ``preflight``: a browser's CORS preflight, answered by the CORS middleware, "preflight"."""
    if refused:  # not "unmatched" with the 404s of scans: an overload or a key problem must show as such
        return "refused"
    if preflight:
        return "preflight"
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    if status != 404 and scope["path"] == "/openapi.json":  # Starlette routes do not record themselves
        return "/openapi.json"
    if status != 404 and scope["path"].startswith(DOCS_FILES + "/"):
        return DOCS_FILES
    return "unmatched"


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class RequestContext:
    """Pure ASGI (no per-request task switch): cheap enough for the hot path."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float = 120.0,
        api_keys: dict[str, KeyGrant] | None = None,
        max_requests: int | None = None,
        server_timing: bool = True,
        timing_origins: list[str] | None = None,
        cors: Callable[[ASGIApp], ASGIApp] | None = None,
        pixels: PixelBudget | None = None,
    ) -> None:
        self.app = app
        self.pixels = pixels or PixelBudget(150_000_000)
        # The CORS layer inside this one (``app.cors_layer``; None without allowed origins): this middleware's own
        # answers (401, 503, 500...) go through it too, so a page can read them.
        self.cors = cors or (lambda answer: answer)
        self.answers_preflights = cors is not None
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.api_keys = api_keys or {}
        self.max_requests = max_requests
        self.server_timing = server_timing
        # Pages of the CORS origins may read Server-Timing through the browser's Performance API too.
        self.timing_allow_origin = ", ".join(timing_origins).encode("ascii") if timing_origins else None
        self.in_progress = 0  # requests past this gate (probes and metrics are never counted nor refused)
        metrics.in_progress.set_function(lambda: self.in_progress)  # read when scraped, not set per request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, spent = time.perf_counter(), timing.begin()
        headers = dict(scope["headers"])
        sent_id = headers.get(b"x-request-id", b"")
        # A client's id is echoed and logged only when it is plainly printable; otherwise a fresh one.
        request_id = sent_id.decode("ascii") if SAFE_REQUEST_ID.fullmatch(sent_id) else uuid.uuid4().hex
        logs.set_request_id(request_id)
        status = 500
        error_code: str | None = None
        declared = headers.get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes
        received = 0
        limit = self.max_body_bytes
        body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if too_large:
                raise self._too_large()
            if body_done:  # later reads wait for the client to hang up (a tiled denoise listens): no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):  # a trickled upload must not hold its slot for good
                    message = await receive()
            except TimeoutError:
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                    {"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large()
                body_done = not message.get("more_body", False)
            return message

        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                nonlocal error_code
                responded = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("ascii"))]
                if self.server_timing:
                    message["headers"].append((b"server-timing", timing.header(spent, time.perf_counter() - started)))
                    if self.timing_allow_origin is not None:
                        message["headers"].append((b"timing-allow-origin", self.timing_allow_origin))
                if status >= 400:
                    error_code = next((v.decode("latin-1") for k, v in message["headers"] if k.lower() == ERROR_CODE), None)
            await send(message)

        # A browser's preflight carries no key (nor a body): the CORS layer answers it, whatever the path.
        preflight = (
            self.answers_preflights
            and scope["method"] == "OPTIONS"
            and {b"origin", b"access-control-request-method"} <= headers.keys()  # as Starlette's CORS tells one
        )
        is_open = preflight or _is_open(scope["path"])
        refusal = None if is_open else self._authenticate(scope, headers)
        if refusal is None and not is_open and self.max_requests is not None and self.in_progress >= self.max_requests:
            # Every request in progress may hold a whole upload in memory: beyond the cap, answer before reading one.
            message = f"{self.in_progress} requests are in progress, the most this server takes; retry shortly"
            refusal = error_response(503, "overloaded", message, {"Retry-After": "1"}, scope["path"])
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if refusal is None and not preflight and encoding not in (b"", b"identity") and scope["path"].startswith("/v1/"):
            # Only /v2, whose tensors compress, inflates bodies; a gzip image or form was "not an image", or a 400.
            shown = encoding[:32].decode("latin-1")
            message = f"Content-Encoding {shown!r} is not taken here: send the body as is (images are compressed already)"
            refusal = error_response(415, "unsupported_media_type", message, None, scope["path"])
        counted = refusal is None and not is_open
        self.in_progress += counted
        state = scope.setdefault("state", {})
        state[PIXELS] = self.pixels
        try:
            if refusal is not None:  # answered before any of the body is read (a multipart form: up to 25 MB)
                await self.cors(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except ClientDisconnect:  # the client hung up mid-upload: nobody to answer, and not a server error
            status, error_code = 499, "client_closed"
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its shutdown grace (OCELLUS_SHUTDOWN_GRACE_S) ends:
            # the connection is still open, so the client learns to retry instead of reading an empty reply.
            if responded:
                raise
            message = "the server is shutting down; retry (another replica answers behind a load balancer)"
            answer = error_response(503, "shutting_down", message, {"Retry-After": "1"}, scope["path"])
            await self.cors(answer)(scope, receive, send_with_id)
            # Not re-raised: this request's task ends here anyway, and uvicorn would log the cancellation as an
            # "Exception in ASGI application" traceback for every request cut off this way.
        except Exception:
            # Answered here, not by Starlette's outermost handler: the 500 keeps its request id and the
            # logs stay one JSON object per line.
            if responded:
                raise
            extra = {"request_id": request_id, "method": scope["method"], "path": logged_path(scope["path"])}
            log.exception("unhandled error", extra=extra)
            message = "the server failed to handle this request"
            await self.cors(error_response(500, "internal_error", message, path=scope["path"]))(scope, receive, send_with_id)
        finally:
            self.in_progress -= counted
            self.pixels.give(state.pop(PIXELS_TAKEN, 0))  # once the answer is sent: its body held the photo's result
            path = _route_label(scope, status, refused=refusal is not None, preflight=preflight)
            seconds = time.perf_counter() - started
            method = scope["method"]
            # A label from a bounded set: h11 (uvicorn's fallback parser) passes any token, each a new series for good.
            label = method if method in HTTP_METHODS else "other"
            self.metrics.requests.labels(label, path, str(status)).inc()
            self.metrics.latency.labels(label, path).observe(seconds)
            if status >= 400:
                self.metrics.errors.labels(str(status), error_code or "unknown").inc()
            # Probes and scrapes come every few seconds from machines: their lines would drown the clients' ones.
            log.log(
                logging.DEBUG if path in QUIET_ROUTES and status < 400 else logging.INFO,
                "request",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": logged_path(scope["path"]),
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                    "error": error_code,
                    "client": (scope.get("client") or ("-",))[0],  # the balancer's X-Forwarded-For behind one (uvicorn)
                    "key": getattr(scope.get("state", {}).get(API_GRANT), "label", None),  # who called: an audit trail
                    "timings": timing.milliseconds(spent),  # where the time went (service/timing.py)
                    "wrote": scope.get("state", {}).get(WROTE),  # the subject and face a gallery write made: an audit trail
                },
            )

    def _authenticate(self, scope: Scope, headers: dict[bytes, bytes]) -> ASGIApp | None:
        """With keys set, the 401 answer for a request without a known key, given before its body is read;
        otherwise None, the key's grant recorded for the routes (``deps.require`` checks it)."""
        if not self.api_keys:
            return None
        key = headers.get(b"x-api-key", b"").strip()
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        key = key or (credentials.strip() if scheme.lower() == b"bearer" else b"")
        found = self.api_keys.get(key.decode("latin-1")) if key else None
        if found is not None:
            scope.setdefault("state", {})[API_GRANT] = found
            return None
        message = "unknown API key" if key else "send an API key in X-API-Key or Authorization: Bearer"
        return error_response(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"}, scope["path"])

    def _too_large(self) -> ApiError:
        return ApiError(413, "payload_too_large", f"the request body exceeds {self.max_body_bytes:,} bytes")
