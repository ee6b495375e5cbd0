"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.errors import ERROR_CODE_HEADER
from service.api.schemas import GalleryState, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: at least one model loaded",
    responses={503: {"model": Readiness, "description": "no model is loaded"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 while at least one model is loaded; each model's state, and whether the gallery store answers."""
    repository = request.app.state.repository
    # /readyz stays open to probes when keys are set; the reasons (file paths, ONNX Runtime's messages)
    # are then only shown to a key holder, by GET /v1/models/{name}.
    keyed = bool(request.app.state.settings.api_key_entries)
    states: dict[str, str] = {}
    for name, model in repository.loaded.items():
        why = f"GET /v1/models/{name} says why" if keyed else f"its folder fails: {model.reload_error}"
        states[name] = "ready" if model.reload_error is None else f"ready (last good version; {why})"
    for name, failure in repository.failed.items():
        states[name] = f"failed (GET /v1/models/{name} says why)" if keyed else f"failed: {failure.error}"
    ready = bool(repository.loaded)
    replica = getattr(request.app.state, "galleries", None)
    gallery = (
        GalleryState(loaded=replica.loaded, faces=len(replica.face_keys), seq=replica.seq, reachable=replica.healthy)
        if replica
        else None
    )
    readiness = Readiness(ready=ready, models=states, gallery=gallery, defaults=repository.default_problems())
    # Not ready is an error like any other for the metrics (counted by code) and the access log.
    return JSONResponse(readiness.model_dump(), 200 if ready else 503, None if ready else {ERROR_CODE_HEADER: "not_ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, errors by code, per model inference time, batch sizes, queue time and
    length, and the gallery: store reachable, faces indexed, seconds since the last full sync, search time."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
