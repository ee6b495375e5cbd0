"""Embeddings instead of photos: ``POST /v1/galleries/{g}/identify/embeddings`` and ``POST /v1/faces/verify/embeddings``.

For clients that already hold embeddings made by ``/v1/faces/embed`` (kept beside their own records, or made
once and searched in several galleries): no photo travels or is decoded again. The body says which model
version made them, and one made by another version is refused, as a photo's embedding is never compared
with another model's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.deps import INLINE_DECODE_BYTES, JSON_TYPE, content_type, no_repeated_keys, require
from service.api.errors import ApiError
from service.api.faces import MAX_FACES_LIMIT, FarQuery, ModelQuery, SimilarityQuery, embedding_size, face_pipeline
from service.api.galleries import (
    GALLERY_RESPONSES,
    GalleryPath,
    GallerySearch,
    Matches,
    matches_above,
    replica,
    search_summary,
)
from service.gallery.index import DimensionMismatch
from service.manifest import Manifest
from service.tasks.faces import cosine
from service.workers import image_thread

RESPONSES = {
    **GALLERY_RESPONSES,
    409: {**GALLERY_RESPONSES[409], "description": "model_mismatch: another model version made them"},
}
router = APIRouter(prefix="/v1/galleries", tags=["galleries"], responses=RESPONSES)
faces_router = APIRouter(prefix="/v1/faces", tags=["faces"], responses={409: RESPONSES[409]})

MAX_BODY_BYTES = 2 * 1024 * 1024  # 100 embeddings of 512 floats written with 17 digits take ~1.1 MB


Version = Annotated[
    str,
    Field(
        max_length=200,
        description="the `version` /v1/faces/embed answered with: embeddings another version made are refused",
        examples=["1+2a40aca11760"],  # the committed lfw-face's (a test keeps it so)
    ),
]


class EmbeddingQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Version
    embeddings: list[list[Annotated[float, Field(strict=True, allow_inf_nan=False)]]] = Field(
        min_length=1, max_length=MAX_FACES_LIMIT, description="embeddings as /v1/faces/embed returns them (any length scale)"
    )


class EmbeddingPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Version
    source: list[Annotated[float, Field(strict=True, allow_inf_nan=False)]] = Field(
        min_length=1, description="the embedding to compare, as /v1/faces/embed returns it"
    )
    targets: list[list[Annotated[float, Field(strict=True, allow_inf_nan=False)]]] = Field(
        min_length=1, max_length=MAX_FACES_LIMIT, description="the embeddings to compare it with"
    )


class ComparedEmbedding(BaseModel):
    similarity: float = Field(description="cosine similarity with the source, -1..1")
    match: bool = Field(description="similarity >= threshold")


class VerifyEmbeddingsResponse(BaseModel):
    model: str
    version: str
    threshold: float = Field(description="match when similarity >= threshold")
    far: float | None = Field(description="false-accept rate the threshold was calibrated at (on held-out pairs)")
    results: list[ComparedEmbedding] = Field(description="one per target, in order")


class EmbeddingSearchResponse(GallerySearch):
    results: list[Matches] = Field(description="one per embedding sent, in order")


BodyT = TypeVar("BodyT", EmbeddingQuery, EmbeddingPair)
# Each body's shape, and the most lists it can hold (the outer list, and the source's).
SHAPES: dict[type[BaseModel], tuple[str, int]] = {
    EmbeddingQuery: ('{"version": "...", "embeddings": [[...], ...]}', MAX_FACES_LIMIT + 1),
    EmbeddingPair: ('{"version": "...", "source": [...], "targets": [[...], ...]}', MAX_FACES_LIMIT + 2),
}

BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {JSON_TYPE: {"schema": EmbeddingQuery.model_json_schema()}},
    }
}


def outside_strings(raw: bytes) -> bytes:
    """JSON text without its strings, in linear time: escaped backslashes, then escaped quotes, go first, so every quote
    left opens or closes a string. Exact for the valid JSON that the parser reads before any error it stops at."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(unescaped.split(b'"')[::2])


async def embedding_query(request: Request, shape: type[BodyT] = EmbeddingQuery) -> BodyT:  # type: ignore[assignment]
    """The JSON body, refused before parsing when it is larger or more nested than embeddings can be."""
    example, most_lists = SHAPES[shape]
    if content_type(request) != JSON_TYPE:
        raise ApiError(415, "unsupported_media_type", f"send a JSON object: {example}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"at most {MAX_BODY_BYTES:,} bytes of embeddings ({MAX_FACES_LIMIT} of them)")
    lists, objects = raw.count(b"["), raw.count(b"{")
    # Or brackets in a string ("version": "v{1}"): counted again without strings, in UTF-8 only (json.loads also reads
    # UTF-16 and -32, where a character's byte may be a quote: a nested body then counted as none).
    if (lists > most_lists or objects > 1) and b"\x00" not in raw[:4]:
        structure = await image_thread(outside_strings, raw)  # up to ~0.1 s for 2 MB of strings: off the event loop
        lists, objects = structure.count(b"["), structure.count(b"{")
    if lists > most_lists:  # more lists than the most embeddings taken
        message = f"send {example}: at most {MAX_FACES_LIMIT} lists of numbers"
        raise ApiError(422, "invalid_parameter", message)
    if objects > 1:
        raise ApiError(422, "invalid_parameter", f"send one flat object: {example}")

    def parse() -> BodyT:
        try:
            return shape.model_validate(json.loads(raw, object_pairs_hook=no_repeated_keys))
        except (ValueError, RecursionError) as error:  # json's and pydantic's (ValidationError is a ValueError)
            raise body_error(error, ", ".join(shape.model_fields)) from None

    # 100 embeddings of 512 numbers (1 MB) take ~19 ms to parse: off the event loop, as large image bodies are.
    return await image_thread(parse) if len(raw) > INLINE_DECODE_BYTES else parse()


def body_error(error: Exception, keys: str = "version, embeddings") -> ApiError:
    if not isinstance(error, ValidationError):
        return ApiError(400, "bad_request", f"the JSON body does not parse: {str(error)[:200]}")
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"unknown JSON key {where[:40]!r}: the body takes {keys}"
        return ApiError(422, "unknown_parameter", message + " (model, top_k, threshold and far go in the query string)")
    return ApiError(422, "invalid_parameter", f"{where or 'body'}: {first['msg']}")


def unit_rows(embeddings: list[list[float]], size: int | None, field: str = "embeddings") -> np.ndarray:
    """The embeddings at unit length (float32), computed in float64: any finite scale of a vector will do."""
    lengths = sorted({len(e) for e in embeddings})
    if len(lengths) > 1 or (size is not None and lengths[0] != size):
        wanted = size or "the same number of"
        raise ApiError(422, "invalid_parameter", f"{field}: each must hold {wanted} numbers (got {lengths})")
    vectors = np.array(embeddings, dtype=np.float64)
    largest = np.abs(vectors).max(axis=1, keepdims=True)
    if np.any(largest == 0):
        raise ApiError(422, "invalid_parameter", f"{field}: an embedding of zeros has no direction")
    vectors /= largest  # first: the norm of one scaled by 1e300 overflowed (it was refused as "too large")
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def check_version(version: str, manifest: Manifest) -> None:
    if version != manifest.weights_version:
        raise ApiError(
            409,
            "model_mismatch",
            # The body names no model: the embeddings may be another loaded model's, or this one's before a change.
            f"version {version[:60]!r} is not {manifest.name}'s ({manifest.weights_version!r}): pass the model= "
            "that /v1/faces/embed answered with, or embed the photos again",
        )


@faces_router.post(
    "/verify/embeddings",
    response_model=VerifyEmbeddingsResponse,
    openapi_extra={"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": EmbeddingPair.model_json_schema()}}}},
    dependencies=[require("infer")],
    summary="Are these embeddings (from /v1/faces/embed) the same person as the source?",
)
async def verify_embeddings(
    request: Request, model: ModelQuery = None, threshold: SimilarityQuery = None, far: FarQuery = None
) -> VerifyEmbeddingsResponse:
    """`/v1/faces/verify` for embeddings already made by `/v1/faces/embed` (CompreFace's embedding verification): the
    `source`'s cosine similarity with each of the `targets`, and whether it matches at the model's 1:1 threshold (or
    the `threshold` or `far` given). `version` must be the one embed answered with."""
    pair = await embedding_query(request, EmbeddingPair)
    pipeline = face_pipeline(request, model, detect=False)
    manifest = pipeline.embedder.manifest
    decision, decided_far = pipeline.decision(threshold, far)
    check_version(pair.version, manifest)
    size = embedding_size(pipeline.embedder)
    source = unit_rows([pair.source], size, "source")[0]
    targets = unit_rows(pair.targets, size or len(source), "targets")
    similarities = [cosine(value) for value in targets @ source]
    return VerifyEmbeddingsResponse(
        model=manifest.name,
        version=manifest.weights_version,
        threshold=decision,
        far=decided_far,
        results=[ComparedEmbedding(similarity=value, match=value >= decision) for value in similarities],
    )


@router.post(
    "/{g}/identify/embeddings",
    response_model=EmbeddingSearchResponse,
    openapi_extra=BODY_DOC,
    dependencies=[require("read")],
    summary="Who are these embeddings (from /v1/faces/embed)? Each -> the closest subjects, or unknown",
)
async def identify_embeddings(
    request: Request,
    g: GalleryPath,
    model: ModelQuery = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="candidates per embedding")] = 3,
    threshold: SimilarityQuery = None,
    far: FarQuery = None,
) -> EmbeddingSearchResponse:
    """Embeddings made by `/v1/faces/embed`, with no photo sent again, against the gallery: each one's `top_k`
    closest subjects and its `match`. `version` must be the one embed answered with."""
    query = await embedding_query(request)
    pipeline = face_pipeline(request, model, detect=False)
    manifest = pipeline.embedder.manifest
    decision, decided_far = pipeline.decision(threshold, far, identify=True)
    check_version(query.version, manifest)
    vectors = unit_rows(query.embeddings, embedding_size(pipeline.embedder))
    gallery = replica(request)
    try:
        results = await gallery.identify(g, manifest.name, manifest.weights_version, vectors, top_k)
    except DimensionMismatch as error:  # a model of unknown embedding size, and the gallery's faces hold another
        raise ApiError(422, "invalid_parameter", f"embeddings: {error}") from None
    summary = await search_summary(gallery, g, manifest, decision, decided_far)
    results_out = [matches_above(gallery, matches, decision) for matches in results]
    return EmbeddingSearchResponse(**summary.model_dump(), results=results_out)
