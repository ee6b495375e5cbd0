"""Response bodies (pydantic), so /docs shows what each endpoint returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, JsonValue

from service.api.errors import ERROR_CODES


class ErrorDetail(BaseModel):
    code: str = Field(
        description="stable and machine-readable (the README lists each with its meaning)",
        json_schema_extra={"enum": list[JsonValue](sorted(ERROR_CODES))},
    )
    message: str = Field(description="for people: what went wrong and what to send instead")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelStatus(BaseModel):
    name: str
    state: str  # "ready" | "failed"
    task: str | None = None
    version: str | None = None
    weights_version: str | None = Field(
        None, description="version + the graph's hash: what gallery faces record (`faces[].version`) and /v1/faces report"
    )
    sha256: str | None = None
    loaded_at: float | None = Field(
        None, description="when this version was loaded (Unix seconds); a reload keeps it while the folder's files are unchanged"
    )
    error: str | None = None
    labels: list[str] = []
    input: dict[str, Any] | None = None
    outputs: dict[str, str] | None = None
    defaults: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    serving: dict[str, int | float] | None = Field(
        None, description="micro-batcher and session settings in effect (the manifest's `serving`, else OCELLUS_*)"
    )
    queued: int | None = Field(None, description="requests waiting for a batch right now")


class ModelList(BaseModel):
    models: list[ModelStatus]


class ReloadChanges(BaseModel):
    loaded: list[str] = Field(description="new models, and models whose files changed, now serving")
    unchanged: list[str] = Field(description="models whose files did not change: the same sessions serve on")
    kept: list[str] = Field(description="models whose folder now fails: the version loaded before serves on (see error)")
    failed: list[str] = Field(description="models that do not load and had no version to keep")
    removed: list[str] = Field(description="models whose folder is gone: no longer served")


class ReloadResult(ModelList):
    changes: ReloadChanges = Field(description="what this reload did, by model name")


class GalleryState(BaseModel):
    loaded: bool  # false while the store has been unreachable since start-up (galleries answer 503)
    faces: int  # enrolled faces this replica holds in memory, all galleries and models
    seq: int  # the last change-log entry applied
    reachable: bool  # the last background sync reached the store (metric ocellus_gallery_up)


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str]
    gallery: GalleryState | None = None
    defaults: dict[str, str] = Field(
        default_factory=dict,
        description="by task, OCELLUS_DEFAULT_MODELS entries that cannot serve it now (requests naming no model fail)",
    )


class ClassPrediction(BaseModel):
    label: str
    index: int
    probability: float


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[ClassPrediction]


def model_headers(**extra: str) -> dict[str, Any]:
    """OpenAPI headers of a 200 whose body is an image: the model that answered, and ``extra`` (name=description)."""
    described = {
        "X-Model": "the model that answered",
        "X-Model-Version": "its manifest version (percent-encoded)",
        "X-Request-ID": "the request's id, also in the access log (a client's own X-Request-ID is echoed)",
        **extra,
    }
    return {name: {"description": text, "schema": {"type": "string"}} for name, text in described.items()}


def error_responses(body: type[BaseModel], descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with its body model and what it means."""
    return {status: {"model": body, "description": description} for status, description in descriptions.items()}


ERROR_RESPONSES = error_responses(
    ErrorBody,
    {
        400: "bad input (empty, corrupt or truncated image), or a model of another task",
        401: "API key required",
        403: "API key's role too weak",
        404: "unknown model",
        408: "the upload did not arrive within OCELLUS_BODY_TIMEOUT_S",
        413: "upload or image too large",
        415: "not an image / wrong content type",
        422: "invalid parameter",
        500: "inference_failed: ONNX Runtime failed on the model, or it answered NaN or infinity",
        503: "model not loaded, or overloaded (Retry-After)",
    },
)
