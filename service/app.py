"""``create_app(settings)``: the FastAPI application with its routers, lifespan and error handlers."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import denoise, detect, embedding_search, faces, galleries, health, models, segment, tasks, v2
from service.api.deps import required_parts
from service.api.errors import error_response, install_error_handlers
from service.api.faces import embedding_size
from service.api.strict import known_fields_only
from service.budget import PixelBudget
from service.gallery.replica import GalleryReplica, StoreUnavailable
from service.gallery.store import GalleryStore, sqlite_url
from service.logs import configure_logging
from service.memory import MALLOC_TRIM, trim_when_idle
from service.metrics import Metrics
from service.middleware import DOCS_FILES, HeadAsGet, RequestContext
from service.repository import ModelRepository
from service.settings import Settings, check_environment

DESCRIPTION = """Vision models trained by Ocellus recipes, served with ONNX Runtime.

Images go as multipart field `file`, as a raw `image/*` body, or base64 in a JSON object (`{"file": "<base64>"}`).
Errors are `{"error": {"code": "...", "message": "..."}}` (under /v2, the protocol's `{"error": "..."}`)."""


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's, but a refused preflight is a JSON error like every other (Starlette answers it in plain text),
    in /v2's shape under /v2."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's own preflight branch, which hands preflight_response the headers only: the error's shape needs the path.
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is not None and scope["method"] == "OPTIONS" and {"origin", "access-control-request-method"} <= set(headers):
            await self.json_preflight_response(headers, scope["path"])(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def json_preflight_response(self, request_headers: Headers, path: str) -> Response:
        response = self.preflight_response(request_headers)
        if response.status_code != 400:
            return response
        cors = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}  # the text's
        return error_response(400, "bad_request", bytes(response.body).decode(), cors, path)


def whole_files(static: ASGIApp) -> ASGIApp:
    """The docs' script files, always whole: Starlette's ranges answered a bad Range header with a plain-text 400
    or 416 (not our JSON error, and counted under code "unknown"); ignoring the header is HTTP's other choice."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_whole(message: Message) -> None:
            if message["type"] == "http.response.start":  # it may not offer ranges it will not serve
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"accept-ranges"]
            await send(message)

        if scope["type"] != "http":
            await static(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"range", b"if-range")]
        await static({**scope, "headers": headers}, receive, send_whole)

    return serve


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    for warning in check_environment(settings):
        logging.getLogger("ocellus").warning(warning)
    metrics = Metrics()
    repository = ModelRepository(settings, metrics)
    pixels = PixelBudget(settings.max_pixels_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository.load_all()
        url = settings.gallery_url or sqlite_url(settings.data_dir)
        store = GalleryStore(url, False, settings.gallery_timeout_s, settings.gallery_max_connections)
        gallery = app.state.galleries = GalleryReplica(
            store,
            settings.gallery_sync_interval_s,
            settings.gallery_ann_min_faces,
            settings.gallery_change_log_keep,
            settings.gallery_timeout_s,
            embedding_length=lambda model, version: loaded_embedding_length(repository, model, version),
        )
        try:
            gallery.load()
        except (SQLAlchemyError, OSError, StoreUnavailable):  # serve everything else; the replica retries in the background
            # (OSError: a SQLite data folder the service may not write, e.g. a host folder mounted over it; StoreUnavailable:
            # the change log pruned past every snapshot the load read)
            logging.getLogger("ocellus.gallery").exception("the gallery store is unreachable")
        metrics.gallery_up.set_function(lambda: float(gallery.healthy))
        metrics.gallery_faces.set_function(lambda: len(gallery.face_keys))
        metrics.gallery_sync_age.set_function(
            lambda: math.inf if gallery.synced_at is None else time.monotonic() - gallery.synced_at
        )
        gallery.on_search = metrics.gallery_search.observe
        gallery.start()
        loop = asyncio.get_running_loop()
        background = [loop.create_task(trim_when_idle(pixels))] if MALLOC_TRIM is not None else []
        if settings.models_poll_s:
            background.append(loop.create_task(repository.poll(settings.models_poll_s)))
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)  # a poll's reload ends before the repository closes
        await gallery.close()
        await repository.close()

    # /docs and /redoc with their scripts served from the package, not a CDN: they work offline too.
    app = FastAPIOffline(
        title="Ocellus",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_FILES,
        # "/v1/classify/" is a 404 naming the path to use, not an empty 307 redirect (which most clients do
        # not follow, and which makes those that do upload the image twice).
        redirect_slashes=False,
    )
    for route in app.routes:
        if isinstance(route, Mount) and route.path == DOCS_FILES:
            route.app = whole_files(route.app)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        return required_parts(generate_openapi()) if fresh else generate_openapi()

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    install_error_handlers(app)
    galleries.install_store_error_handlers(app)
    for module in (health, v2):
        app.include_router(module.router)
    # /v1: unknown parameters are refused (and encoded bodies, by RequestContext)
    routers = [module.router for module in (models, tasks, detect, segment, denoise, faces, galleries, embedding_search)]
    for router in (*routers, embedding_search.faces_router):
        app.include_router(router, dependencies=[Depends(known_fields_only)])
    app.add_middleware(HeadAsGet)  # innermost: logs and metrics still say HEAD
    cors = cors_layer(settings.cors_origin_list)
    if cors is not None:  # inside RequestContext, so preflights get a request id, a log line and metrics too
        app.add_middleware(cors)
    app.add_middleware(  # outermost
        RequestContext,
        metrics=metrics,
        max_body_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        api_keys=settings.api_key_entries,
        max_requests=settings.max_requests,
        pixels=pixels,
        server_timing=settings.server_timing,
        timing_origins=settings.cors_origin_list,
        cors=cors,
    )
    return app


def cors_layer(origins: list[str]) -> Callable[[ASGIApp], ASGIApp] | None:
    """The CORS middleware for these origins (None: no origin is allowed); RequestContext wraps its own answers
    (401, 413, 503...) in it too, so a page can read those errors as well."""
    if not origins:
        return None
    return functools.partial(
        JsonCORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],  # HEAD works wherever GET does
        allow_headers=["*"],  # X-API-Key, Authorization, X-Request-ID, Content-Type
        expose_headers=[  # every header of ours a page may need to read
            "X-Request-ID",
            "X-Error-Code",
            "Server-Timing",
            "Retry-After",
            "X-Model",
            "X-Model-Version",
            "X-Labels",
            "X-Detections",
            "X-Tiles",
            "X-Face-Box",
            "Inference-Header-Content-Length",
        ],
        max_age=600,
    )


def loaded_embedding_length(repository: ModelRepository, model: str, version: str) -> int | None:
    """The length of the embeddings ``model`` makes when that version of it is loaded (else None: unknown)."""
    loaded = repository.loaded.get(model)
    return embedding_size(loaded) if loaded is not None and loaded.manifest.weights_version == version else None
