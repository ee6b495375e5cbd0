"""The model repository over HTTP: list, describe, reload."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Request

from service.api.deps import require
from service.api.errors import ApiError
from service.api.schemas import ERROR_RESPONSES, ErrorBody, ModelList, ModelStatus, ReloadChanges, ReloadResult
from service.repository import FailedModel, LoadedModel, ModelRepository

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)


def describe(model: LoadedModel | FailedModel) -> ModelStatus:
    if isinstance(model, FailedModel):
        return ModelStatus(name=model.name, state="failed", error=model.error)
    m = model.manifest
    return ModelStatus(
        name=m.name,
        state="ready",
        task=m.task.value,
        version=m.version,
        weights_version=m.weights_version,
        sha256=m.sha256,
        loaded_at=model.loaded_at,
        error=None if model.reload_error is None else f"serving the version loaded before; a reload failed: {model.reload_error}",
        labels=m.labels,
        input=m.input.model_dump(),
        outputs=m.outputs,
        defaults=m.defaults,
        metrics=m.metrics,
        training=m.training,
        serving=asdict(model.serving),
        queued=model.batcher.queued_count(),
    )


def _all(repository: ModelRepository) -> list[ModelStatus]:
    models = [describe(m) for m in repository.loaded.values()] + [describe(m) for m in repository.failed.values()]
    return sorted(models, key=lambda status: status.name)


@router.get("", response_model=ModelList, dependencies=[require("infer")], summary="Every model, ready or failed")
async def list_models(request: Request) -> ModelList:
    """Every model: ready (its manifest, metrics and training record) or failed (its error)."""
    return ModelList(models=_all(request.app.state.repository))


@router.get("/{name}", response_model=ModelStatus, dependencies=[require("infer")], summary="One model's manifest and state")
async def get_model(
    name: Annotated[str, Path(description="the model's name: its folder under the models directory")], request: Request
) -> ModelStatus:
    """One model, with its serving settings and the requests queued for it."""
    repository: ModelRepository = request.app.state.repository
    model = repository.loaded.get(name) or repository.failed.get(name)
    if model is None:
        if name == "reload":  # the POST route beside this one: a GET of it is a wrong method, not an unknown model
            raise ApiError(405, "method_not_allowed", "/v1/models/reload takes POST only", {"Allow": "POST"})
        raise ApiError(404, "unknown_model", f"no model named {name!r}")
    return describe(model)


@router.post(
    "/reload",
    response_model=ReloadResult,
    dependencies=[require("admin")],
    summary="Re-scan the model repository (admin); requests in flight finish on the old models",
    responses={
        409: {
            "model": ErrorBody,
            "description": "models_dir_missing, models_dir_unreadable: the models folder is gone or may not be listed "
            "(nothing changes)",
        }
    },
)
async def reload_models(request: Request) -> ReloadResult:
    """Re-scan the models folder: load new and changed models, keep serving the last good version of one that now
    fails, drop removed ones; `changes` says which did what."""
    repository: ModelRepository = request.app.state.repository
    changes = await repository.reload()
    return ReloadResult(models=_all(repository), changes=ReloadChanges(**changes))
