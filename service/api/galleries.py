"""Face galleries: enroll a person from one photo, identify faces, list and delete. No retraining.

A gallery ``{g}`` is a named collection (created by its first subject); subject names are unique
per gallery. Every enrolled face stores the embedding of the model that made it (name and
``Manifest.weights_version``: the version string plus the graph's hash, so retrained weights
count as another model even when the version was not bumped); identification only compares
embeddings of the model it runs with, and the response says how many enrolled faces another
model made. ``POST /{g}/reembed`` moves those to the current model from the face region kept with
each enrollment (``OCELLUS_GALLERY_KEEP_PHOTOS``); faces without one need re-enrolling.

Reads need the ``read`` role, enrollments and deletions ``write`` (when API keys are set); a key limited to
some galleries gets a 403 on any other, and lists only its own.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import JSON_TYPE, RAW_BODY_DOC, caller_grant, read_image, record_write, require, small_json_object
from service.api.errors import ApiError, error_response
from service.api.faces import (
    MASK_DOC,
    Box,
    DetectQuery,
    FacePipeline,
    FarQuery,
    ModelQuery,
    ScoreQuery,
    SimilarityQuery,
    SmallestFaceQuery,
    VerifiedFace,
    crop_batch,
    embed_batch,
    embedding_size,
    face_pipeline,
    find_faces,
    largest_face,
)
from service.api.masks import Mask, MaskQuery
from service.api.schemas import ERROR_RESPONSES, ErrorBody
from service.api.strict import check_json_keys
from service.gallery import GALLERY_NAME
from service.gallery.index import DimensionMismatch, Match
from service.gallery.names import MAX_NAME, MAX_SENT_NAME, InvalidName, normal_name
from service.gallery.replica import GalleryReplica, StoreUnavailable
from service.gallery.store import (
    ID_PATTERN,
    DuplicateFace,
    DuplicateName,
    FacePhoto,
    FaceRecord,
    GalleryStore,
    NewFace,
    NotFound,
    SimilarFace,
    StaleFace,
    SubjectRecord,
)
from service.images import decode_image
from service.manifest import Manifest
from service.tasks.faces import cosine, enrollment_photo
from service.workers import image_thread

T = TypeVar("T")
GALLERY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorBody, "description": "unknown model, gallery (one without subjects), subject or face"},
    409: {
        "model": ErrorBody,
        "description": "duplicate_name, duplicate_face, already_enrolled (reject_duplicates), no_faces, no_comparable_faces",
    },
}
router = APIRouter(prefix="/v1/galleries", tags=["galleries"], responses=GALLERY_RESPONSES)

GALLERY_PATTERN = f"^{GALLERY_NAME}$"
GalleryPath = Annotated[
    str, Path(pattern=GALLERY_PATTERN, description="gallery name: letters, digits, _ . - (max 64)", examples=["demo"])
]
IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="an id as the API answered it: 32 hex digits")]


def person_name(raw: str, field: str, prefix: bool = False) -> str:
    """``raw`` spelt as names are stored (``normal_name``); a 422 naming ``field`` for a name that cannot be one."""
    try:
        return normal_name(raw, prefix)
    except InvalidName as error:
        raise ApiError(422, "invalid_parameter", f"{field}: {error}") from None


def lookup_names(raw: str, prefix: bool = False) -> list[str]:
    """The spellings a ``name`` lookup (or a ``name_prefix``) matches: today's (NFKC, one space) and the one sent,
    since names stored by earlier versions or kept by an import (backup.py) kept theirs, even one today's rules refuse
    (a 422 made such a person unreachable by name, and the enroll tool report them failed on every rerun)."""
    sent = raw if prefix else raw.strip()  # a prefix keeps its spaces: "Ann " is no "Ann"
    try:
        return [normal_name(raw, prefix), sent]
    except InvalidName as error:
        # No stored name is blank, longer than a name can be, or holds a control character (a NUL fails PostgreSQL's
        # text binding: a 503).
        if not (sent or prefix) or len(raw) > MAX_SENT_NAME or any(unicodedata.category(c) == "Cc" for c in raw):
            raise ApiError(422, "invalid_parameter", f"{'name_prefix' if prefix else 'name'}: {error}") from None
        return [sent]


MAX_PAGE = 1000


class FaceOut(BaseModel):
    id: str
    model: str
    version: str
    box: Box  # in the photo it was enrolled from (stored to 0.01 px)
    created_at: float = Field(description="Unix seconds")


class FaceDetail(FaceOut):
    subject_id: str
    photo: bool = Field(description="the photo region it was enrolled from is kept: GET .../faces/{face_id}/photo")


class SubjectOut(BaseModel):
    id: str
    gallery: str
    name: str
    created_at: float = Field(description="Unix seconds")
    face_count: int
    faces: list[FaceOut] | None = None


class SubjectPage(BaseModel):
    gallery: str
    total: int
    limit: int
    offset: int
    subjects: list[SubjectOut]
    next: str | None = Field(description="pass as `after` for the next page; null on the last one")


class GalleryOut(BaseModel):
    name: str
    subjects: int
    faces: int


class GalleryList(BaseModel):
    total: int = Field(description="galleries this caller may see")
    limit: int
    offset: int
    galleries: list[GalleryOut]


class ModelFaces(BaseModel):
    model: str
    version: str = Field(description="the weights version (`version+hash`), as /v1/models reports it")
    faces: int


class GalleryDetail(GalleryOut):
    models: list[ModelFaces] = Field(description="which models made the faces: identify compares only its own model's")


class Candidate(BaseModel):
    subject_id: str
    name: str
    similarity: float
    face_id: str  # the subject's closest enrolled face


class EnrolledFace(BaseModel):
    subject: SubjectOut
    face: FaceOut
    faces_found: int = Field(description="faces in the photo; the largest was enrolled")
    similar_subjects: list[Candidate] | None = Field(
        description="other enrolled subjects this face matches at the identify threshold, best first: the same person "
        "enrolled twice, or a look-alike (empty: none; null: this replica could not search just now, the face is enrolled)"
    )


class SubjectVerification(BaseModel):
    subject_id: str
    name: str
    model: str
    version: str
    match: bool
    similarity: float = Field(description="cosine similarity to the subject's closest enrolled face")
    threshold: float
    far: float | None
    compared_faces: int = Field(description="the subject's faces made by this model and version")
    face: VerifiedFace


class Matches(BaseModel):
    match: Candidate | None = Field(description="the best subject when its similarity >= threshold; null = unknown")
    candidates: list[Candidate] = Field(description="the top_k closest subjects, best first, whatever their similarity")


class IdentifiedFace(Matches):
    box: Box
    score: float | None
    mask: Mask | None = Field(None, description=MASK_DOC)


class GallerySearch(BaseModel):
    gallery: str
    model: str
    version: str
    threshold: float = Field(description="similarity to accept a match; default: the model's identify_threshold (1:N)")
    far: float | None = Field(description="false-accept rate per comparison that default was calibrated at")
    searched: int = Field(description="enrolled faces compared (those made by this model and version)")
    other_model_faces: int = Field(description="enrolled faces made by another model or version: not comparable, skipped")


class IdentifyResponse(GallerySearch):
    faces_found: int = Field(description="faces the detector found; `faces` holds the max_faces largest")
    faces: list[IdentifiedFace]


def face_out(record: FaceRecord) -> FaceOut:
    x1, y1, x2, y2 = record.box
    return FaceOut(
        id=record.id,
        model=record.model,
        version=record.model_version,
        box=Box(x1=x1, y1=y1, x2=x2, y2=y2),
        created_at=record.created_at,
    )


def subject_out(record: SubjectRecord, with_faces: bool) -> SubjectOut:
    faces = [face_out(face) for face in record.faces] if with_faces else None
    return SubjectOut(
        id=record.id,
        gallery=record.gallery,
        name=record.name,
        created_at=record.created_at,
        face_count=record.face_count,
        faces=faces,
    )


def replica(request: Request) -> GalleryReplica:
    return request.app.state.galleries


# Enrollment from a group photo takes its largest face; a client that cannot check who that is refuses them.
SingleFaceQuery = Annotated[
    bool,
    Query(description="refuse (422 several_faces) a photo with more than one face found, instead of enrolling the largest"),
]


MinFaceQuery = Annotated[
    int | None,
    Query(ge=0, le=10_000, description="the smallest face side to enroll, in photo pixels; default OCELLUS_GALLERY_MIN_FACE_PX"),
]


async def enrollment_face(
    request: Request,
    data: bytes,
    pipeline: FacePipeline,
    single_face: bool,
    score_threshold: float | None,
    min_face_size: int | None,
) -> tuple[NewFace, int]:
    smallest = request.app.state.settings.gallery_min_face_px if min_face_size is None else min_face_size
    smallest = smallest if pipeline.detector is not None else 0  # detect=false: the whole photo is the face
    # The largest face is enrolled; faces under `smallest` are left out of it and of the count (a 21 px face in a
    # corner of a portrait made single_face refuse it, under min_face_size 40).
    faces = await find_faces(request, data, pipeline, 1, score_threshold, smallest)
    found, total = faces.found, faces.total
    if not found:
        smaller = (await find_faces(request, data, pipeline, 1, score_threshold)).found if smallest else []
        if not smaller:
            raise ApiError(422, "no_face", "no face was found in the photo")
        x1, y1, x2, y2 = smaller[0].box
        raise ApiError(
            422,
            "face_too_small",
            f"the largest face found is {x2 - x1:.0f}x{y2 - y1:.0f} px; enrollment needs {smallest} px or more on its "
            "shorter side (min_face_size): send a closer or larger photo",
        )
    if single_face and total > 1:
        raise ApiError(422, "several_faces", f"{total} faces were found in the photo; send a photo of this person alone")
    manifest = pipeline.embedder.manifest
    photo = None
    if request.app.state.settings.gallery_keep_photos:
        whole = pipeline.detector is None
        assert faces.photo is not None  # (a face was found in it)
        region, box = await image_thread(enrollment_photo, faces.photo, found[0].box, whole)
        photo = FacePhoto(region, box, whole)
    upload = hashlib.sha256(data)
    if pipeline.detector is None:
        upload.update(b"\0whole")  # the whole photo as the face: another face than the one detected in it
    new = NewFace(found[0].embedding, manifest.name, manifest.weights_version, found[0].box, photo, upload.hexdigest())
    return new, total


def candidate(gallery: GalleryReplica, match: Match) -> Candidate:
    name = gallery.names.get(match.subject_id, "")
    return Candidate(subject_id=match.subject_id, name=name, similarity=match.similarity, face_id=match.face_id)


SIMILAR_SUBJECTS = 5  # listed at most, on an enrollment


async def similar_subjects(
    request: Request, g: str, pipeline: FacePipeline, face: NewFace, other_than: str | None, required: bool = False
) -> list[Candidate] | None:
    """Enrolled subjects (but ``other_than``) that ``face`` matches at the identify threshold, before it is stored.
    Advice, unless ``required``: None while this replica cannot search (reloading, or the store briefly out), where
    the enrollment itself may still succeed, as it did before this check existed."""
    gallery, manifest = replica(request), pipeline.embedder.manifest
    try:
        # Advice reads the index as it is (the write after it catches up anyway); a refusal must see the store's now.
        query = face.embedding[None]
        [matches] = await gallery.identify(g, manifest.name, manifest.weights_version, query, SIMILAR_SUBJECTS + 1, required)
    except (StoreUnavailable, SQLAlchemyError, DimensionMismatch) as error:
        if required and isinstance(error, DimensionMismatch):
            raise not_comparable(manifest, error) from None
        if required:
            raise
        logging.getLogger("ocellus.gallery").warning("similar_subjects skipped: this replica cannot search now", exc_info=True)
        return None
    # A subject without a name here is mid-way through a catch-up (merged away or deleted): not advice.
    similar = [m for m in matches if m.similarity >= pipeline.identify_threshold and m.subject_id != other_than]
    found = [candidate(gallery, m) for m in similar if m.subject_id in gallery.names]
    return found[:SIMILAR_SUBJECTS]


def enrolled_already(g: str, code: str, subject_id: str, reason: str) -> ApiError:
    """The 409 for a photo of someone enrolled already: why, and where to add the photo instead."""
    return ApiError(409, code, f"{reason}; POST /v1/galleries/{g}/subjects/{subject_id}/faces adds this photo to them")


def still_enrolled(request: Request, similar: list[Candidate] | None) -> list[Candidate] | None:
    """``similar``, read before the write, as the replica stands after it (the write caught it up): a subject deleted
    or merged away meanwhile goes (another replica's deletion was listed), a renamed one shows its name now."""
    if not similar:
        return similar
    names = replica(request).names
    return [c.model_copy(update={"name": names[c.subject_id]}) for c in similar if c.subject_id in names]


@router.get("", response_model=GalleryList, dependencies=[require("read")], summary="List galleries")
async def list_galleries(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="galleries per page")] = MAX_PAGE,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="galleries to skip (by name)")] = 0,
) -> GalleryList:
    """The galleries that have subjects, by name, page by page, with their counts (a key limited to some galleries
    sees only those)."""
    gallery, grant = replica(request), caller_grant(request)
    rows = await gallery.store_call(gallery.store.galleries)
    shown = [row for row in rows if grant is None or grant.may_use(row[0])]  # a key limited to some sees only those
    page = [GalleryOut(name=name, subjects=subjects, faces=faces) for name, subjects, faces in shown[offset : offset + limit]]
    return GalleryList(total=len(shown), limit=limit, offset=offset, galleries=page)


@router.get("/{g}", response_model=GalleryDetail, dependencies=[require("read")], summary="One gallery: counts and models")
async def get_gallery(request: Request, g: GalleryPath) -> GalleryDetail:
    """A gallery's counts, and which model (and version) made how many of its faces."""
    gallery = replica(request)
    subjects, counts = await gallery.store_call(gallery.store.gallery_counts, g)
    if not subjects:
        raise unknown_gallery(g)
    models = [ModelFaces(model=model, version=version, faces=n) for (model, version), n in sorted(counts.items())]
    return GalleryDetail(name=g, subjects=subjects, faces=sum(counts.values()), models=models)


async def require_gallery(gallery: GalleryReplica, g: str) -> None:
    """A 404 for a gallery without subjects: a misspelt name must not read as "nobody matches"."""
    if not await gallery.store_call(gallery.store.has_subjects, g):
        raise unknown_gallery(g)


def unknown_gallery(g: str) -> ApiError:
    return ApiError(404, "unknown_gallery", f"gallery {g!r} has no subjects (names are case-sensitive)")


@router.delete("/{g}", status_code=204, dependencies=[require("write")], summary="Delete a gallery and everyone in it")
async def delete_gallery(request: Request, g: GalleryPath) -> Response:
    """Delete every subject of the gallery and their faces; it cannot be undone (`ocellus-gallery export` keeps a
    copy)."""
    if not await replica(request).delete_gallery(g):
        raise unknown_gallery(g)
    return Response(status_code=204)


NAME_DOC = f"unique within the gallery (at most {MAX_NAME} characters)"


def one_name(in_form: str | None, in_query: str | None) -> str:
    """The subject's name, from the form or the query string (with a raw or JSON body, only there)."""
    if in_form is not None and in_query is not None:
        raise ApiError(422, "repeated_parameter", "name came both in the query string and in the form; send it once")
    name = in_form if in_form is not None else in_query
    if name is None:
        raise ApiError(422, "invalid_parameter", "name: required, as a form field or in the query string (?name=...)")
    return person_name(name, "name")


@router.post(
    "/{g}/subjects",
    status_code=201,
    response_model=EnrolledFace,
    openapi_extra=RAW_BODY_DOC,
    dependencies=[require("write")],
    summary="Enroll a new person from one photo (name + file; the largest face is used)",
)
async def create_subject(
    request: Request,
    g: GalleryPath,
    name_in_query: Annotated[str | None, Query(alias="name", description=NAME_DOC)] = None,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    single_face: SingleFaceQuery = False,
    score_threshold: ScoreQuery = None,
    min_face_size: MinFaceQuery = None,
    reject_duplicates: Annotated[
        bool,
        Query(description="refuse (409 already_enrolled) a face that matches an enrolled subject at the identify threshold"),
    ] = False,
    name: Annotated[str | None, Form(description=NAME_DOC + "; or in the query string")] = None,
    file: Annotated[UploadFile | None, File(description="a photo of the person")] = None,
) -> EnrolledFace:
    """Enroll a new person from one photo, with no retraining: the largest face is embedded and stored under `name`,
    unique within the gallery. `similar_subjects` lists the enrolled subjects this face already matches."""
    if name is not None and file is None:  # a form (urlencoded, or multipart without its photo) is the only body
        raise ApiError(422, "missing_file", "the form has a name but no photo: curl -F name=... -F file=@photo.jpg")
    name = one_name(name, name_in_query)
    data = await read_image(request, file)
    pipeline = face_pipeline(request, model, detect)
    face, found = await enrollment_face(request, data, pipeline, single_face, score_threshold, min_face_size)
    # Faces logged after this the search below may not see: the write checks them again, in the store's write lock.
    unmatched_since = (replica(request).seq, pipeline.identify_threshold) if reject_duplicates else None
    similar = await similar_subjects(request, g, pipeline, face, None, required=reject_duplicates)
    if reject_duplicates and similar:
        if holder := next((s.subject_id for s in similar if s.name == name), None):
            # The name's own subject: this request sent again after its answer was lost (a 409 already_enrolled
            # made the bulk enrollment count that person failed), or a new photo of someone enrolled under that name.
            raise enrolled_already(g, "duplicate_name", holder, str(DuplicateName(g, name, holder)))
        best = similar[0]
        reason = f"the face matches enrolled subject {best.name!r} (id {best.subject_id}, similarity {best.similarity:.3f})"
        raise enrolled_already(g, "already_enrolled", best.subject_id, reason)
    try:
        subject = await replica(request).create_subject(g, name, face, unmatched_since)
    except DuplicateName as error:
        raise enrolled_already(g, "duplicate_name", error.holder, str(error)) from None
    except SimilarFace as error:  # enrolled by another request since the search: two at once cannot both pass
        raise enrolled_already(g, "already_enrolled", error.subject_id, str(error)) from None
    face_record = face_out(subject.faces[0])
    record_write(request, subject=subject.id, face=face_record.id)
    similar = still_enrolled(request, similar)
    return EnrolledFace(subject=subject_out(subject, True), face=face_record, faces_found=found, similar_subjects=similar)


@router.post(
    "/{g}/subjects/{subject_id}/faces",
    status_code=201,
    response_model=EnrolledFace,
    openapi_extra=RAW_BODY_DOC,
    dependencies=[require("write")],
    summary="Add another photo of an enrolled person (the largest face is used)",
)
async def add_face(
    request: Request,
    g: GalleryPath,
    subject_id: IdPath,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    single_face: SingleFaceQuery = False,
    score_threshold: ScoreQuery = None,
    min_face_size: MinFaceQuery = None,
    file: Annotated[UploadFile | None, File(description="a photo of the person")] = None,
) -> EnrolledFace:
    """Add another photo of an enrolled person (its largest face); the same photo twice is a 409 `duplicate_face`."""
    data = await read_image(request, file)
    pipeline = face_pipeline(request, model, detect)
    face, found = await enrollment_face(request, data, pipeline, single_face, score_threshold, min_face_size)
    similar = await similar_subjects(request, g, pipeline, face, subject_id)
    gallery = replica(request)
    try:
        record, subject = await gallery.add_face(g, subject_id, face)
    except NotFound as error:
        raise ApiError(404, "unknown_subject", str(error)) from None
    except DuplicateFace as error:
        raise ApiError(409, "duplicate_face", str(error)) from None
    record_write(request, subject=subject_id, face=record.id)
    similar = still_enrolled(request, similar)
    return EnrolledFace(subject=subject_out(subject, True), face=face_out(record), faces_found=found, similar_subjects=similar)


@router.post(
    "/{g}/subjects/{subject_id}/verify",
    response_model=SubjectVerification,
    openapi_extra=RAW_BODY_DOC,
    dependencies=[require("read")],
    summary="Is the person in this photo (largest face) this enrolled subject? 1:1 verification",
)
async def verify_subject(
    request: Request,
    g: GalleryPath,
    subject_id: IdPath,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    threshold: SimilarityQuery = None,
    far: FarQuery = None,
    score_threshold: ScoreQuery = None,
    min_face_size: SmallestFaceQuery = 0,
    file: Annotated[UploadFile | None, File(description="the photo")] = None,
) -> SubjectVerification:
    """1:1: is the person in this photo that subject? The photo's largest face against the subject's closest enrolled
    face."""
    data = await read_image(request, file)
    pipeline = face_pipeline(request, model, detect)
    decision, decided_far = pipeline.decision(threshold, far)
    manifest = pipeline.embedder.manifest
    with pipeline.in_use():  # the store is read first
        try:
            gallery = replica(request)
            name, enrolled, face_count = await gallery.store_call(
                gallery.store.subject_embeddings,
                g,
                subject_id,
                manifest.name,
                manifest.weights_version,
                embedding_size(pipeline.embedder),
            )
        except NotFound as error:
            raise ApiError(404, "unknown_subject", str(error)) from None
        if not face_count:
            raise ApiError(409, "no_faces", f"{name!r} has no enrolled faces (all were deleted); add a photo of them first")
        if not len(enrolled):
            raise ApiError(
                409,
                "no_comparable_faces",
                f"{name!r} was enrolled with another model than {manifest.name} {manifest.weights_version}: "
                f"POST /v1/galleries/{g}/reembed re-embeds kept photos, or add a photo",
            )
        face, found = await largest_face(request, data, pipeline, "the photo", score_threshold, min_face_size)
    if enrolled.shape[1] != len(face.embedding):  # a graph of free output length, and a damaged store
        raise ApiError(409, "no_comparable_faces", f"{name!r} has no embeddings of this model's length {len(face.embedding)}")
    similarity = cosine((enrolled @ face.embedding).max())
    return SubjectVerification(
        subject_id=subject_id,
        name=name,
        model=manifest.name,
        version=manifest.weights_version,
        match=similarity >= decision,
        similarity=similarity,
        threshold=decision,
        far=decided_far,
        compared_faces=len(enrolled),
        face=VerifiedFace(**face.out().model_dump(), faces_found=found),
    )


@router.get("/{g}/subjects", response_model=SubjectPage, dependencies=[require("read")], summary="List a gallery's subjects")
async def list_subjects(
    request: Request,
    g: GalleryPath,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="subjects per page")] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="subjects to skip (in enrollment order)")] = 0,
    after: Annotated[
        str | None,
        Query(max_length=200, description="the previous page's `next`: pages that no deletion or insertion shifts"),
    ] = None,
    name_prefix: Annotated[
        str | None,
        Query(description="only names starting with this (case-sensitive)"),
    ] = None,
    name: Annotated[
        str | None,
        Query(description="only the subject of this name (as enrolled now, or as stored earlier)"),
    ] = None,
) -> SubjectPage:
    """The gallery's subjects page by page, or those of an exact `name` or a `name_prefix`: follow `next` with
    `after` (an `offset` skips, but a subject deleted from an earlier page meanwhile shifts the later ones).
    A gallery without subjects is a 404 `unknown_gallery`."""
    prefixes = () if name_prefix is None else lookup_names(name_prefix, prefix=True)
    names = None if name is None else lookup_names(name)
    if after is not None and offset:
        raise ApiError(422, "invalid_parameter", "give after (the previous page's next) or offset, not both")
    start = None if after is None else read_cursor(after)
    gallery = replica(request)
    # One more than asked: whether a next page exists.
    records, total = await gallery.store_call(gallery.store.list_subjects, g, limit + 1, offset, prefixes, names, start)
    if not total:  # a misspelt gallery is a 404 here too, not an empty page
        await require_gallery(gallery, g)
    shown = records[:limit]
    following = page_cursor(shown[-1]) if len(records) > limit else None
    subjects = [subject_out(r, False) for r in shown]
    return SubjectPage(gallery=g, total=total, limit=limit, offset=offset, subjects=subjects, next=following)


def page_cursor(last: SubjectRecord) -> str:
    """Opaque to clients: the listing order's key of the page's last subject (repr keeps the float exact)."""
    return base64.urlsafe_b64encode(f"{last.created_at!r} {last.id}".encode()).decode().rstrip("=")


def read_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, subject_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(" ")
        if not re.fullmatch(ID_PATTERN, subject_id) or not math.isfinite(float(created_at)):
            raise ValueError
        return float(created_at), subject_id
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
        raise ApiError(422, "invalid_parameter", "after: not a cursor this listing gave (pass a page's `next` as is)") from None


@router.get(
    "/{g}/subjects/{subject_id}", response_model=SubjectOut, dependencies=[require("read")], summary="A subject and its faces"
)
async def get_subject(request: Request, g: GalleryPath, subject_id: IdPath) -> SubjectOut:
    """One subject with its faces."""
    return subject_out(await stored(request, "unknown_subject", GalleryStore.get_subject, g, subject_id), True)


async def stored(request: Request, not_found: str, read: Callable[..., T], *args: str) -> T:
    """``read(store, *args)``, a GalleryStore method; its NotFound is a 404 whose code is ``not_found``'s value."""
    gallery = replica(request)
    try:
        return await gallery.store_call(read, gallery.store, *args)
    except NotFound as error:
        raise ApiError(404, not_found, str(error)) from None


MAX_RENAME_BODY = 64 * 1024  # a name is at most MAX_NAME characters, escaped


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(
        min_length=1,
        description=f"the new name, unique within the gallery (at most {MAX_NAME} characters)",
    )


@router.patch(
    "/{g}/subjects/{subject_id}",
    response_model=SubjectOut,
    dependencies=[require("write")],
    summary="Rename a subject (its faces and their ids stay)",
    openapi_extra={"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": Rename.model_json_schema()}}}},
)
async def rename_subject(request: Request, g: GalleryPath, subject_id: IdPath) -> SubjectOut:
    """`{"name": "..."}`; a name another subject of the gallery holds is a 409 `duplicate_name`."""
    # Read as the other JSON bodies are (400 for JSON that does not parse, 422 repeated_parameter for a key sent
    # twice, 415 for another content type), not by FastAPI's body parameter, which took the last of two names.
    sent = await small_json_object(request, MAX_RENAME_BODY, '{"name": "..."}')
    check_json_keys(sent, frozenset(Rename.model_fields))
    try:
        body = Rename.model_validate(sent)
    except ValidationError as error:
        raise ApiError(422, "invalid_parameter", f"name: {error.errors()[0]['msg']}") from None
    name = person_name(body.name, "name")
    try:
        record = await replica(request).rename_subject(g, subject_id, name)
    except NotFound as error:
        raise ApiError(404, "unknown_subject", str(error)) from None
    except DuplicateName as error:
        raise ApiError(409, "duplicate_name", str(error)) from None
    return subject_out(record, True)


@router.post(
    "/{g}/subjects/{subject_id}/merge",
    response_model=SubjectOut,
    dependencies=[require("write")],
    summary="Merge a subject into another: its faces move there (their ids stay) and it is deleted",
)
async def merge_subject(
    request: Request,
    g: GalleryPath,
    subject_id: IdPath,
    into: Annotated[str, Query(pattern=ID_PATTERN, description="the subject that keeps the faces, and its name")],
) -> SubjectOut:
    """For one person enrolled twice: this subject's faces move to `into`, keeping their ids, and this subject is
    deleted."""
    if into == subject_id:
        raise ApiError(422, "invalid_parameter", "into: a subject cannot be merged into itself")
    try:
        record = await replica(request).merge_subject(g, subject_id, into)
    except NotFound as error:
        raise ApiError(404, "unknown_subject", str(error)) from None
    record_write(request, merged_into=into)
    return subject_out(record, True)


@router.delete(
    "/{g}/subjects/{subject_id}", status_code=204, dependencies=[require("write")], summary="Delete a subject and its faces"
)
async def delete_subject(request: Request, g: GalleryPath, subject_id: IdPath) -> Response:
    """The subject and all its faces: identify never returns it again, on any replica."""
    try:
        await replica(request).delete_subject(g, subject_id)
    except NotFound as error:
        raise ApiError(404, "unknown_subject", str(error)) from None
    return Response(status_code=204)


@router.delete("/{g}/faces/{face_id}", status_code=204, dependencies=[require("write")], summary="Delete one enrolled face")
async def delete_face(request: Request, g: GalleryPath, face_id: IdPath) -> Response:
    """One enrolled face; its subject stays, with no faces if this was its last."""
    try:
        await replica(request).delete_face(g, face_id)
    except NotFound as error:
        raise ApiError(404, "unknown_face", str(error)) from None
    return Response(status_code=204)


@router.get(
    "/{g}/faces/{face_id}",
    response_model=FaceDetail,
    dependencies=[require("read")],
    summary="One enrolled face: whose, by which model",
)
async def get_face(request: Request, g: GalleryPath, face_id: IdPath) -> FaceDetail:
    """An enrolled face: its subject, the model and version that made its embedding, its box, whether its photo was
    kept."""
    record, kept = await stored(request, "unknown_face", GalleryStore.get_face, g, face_id)
    return FaceDetail(**face_out(record).model_dump(), subject_id=record.subject_id, photo=kept)


@router.get(
    "/{g}/faces/{face_id}/photo",
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {}},
            "description": "the face's photo region (JPEG)",
            "headers": {"X-Face-Box": {"description": "the face in the image: x1,y1,x2,y2 pixels", "schema": {"type": "string"}}},
        }
    },
    dependencies=[require("read")],
    summary="The photo region a face was enrolled from (to check who was enrolled)",
)
async def face_photo(request: Request, g: GalleryPath, face_id: IdPath) -> Response:
    """The face region kept at enrollment (JPEG), with the face's box in it in the `X-Face-Box` header."""
    photo = await stored(request, "unknown_face", GalleryStore.face_photo, g, face_id)
    if photo is None:
        raise ApiError(404, "no_photo", f"no photo was kept with face {face_id!r} (OCELLUS_GALLERY_KEEP_PHOTOS was off)")
    box = ",".join(f"{v:.2f}" for v in photo.box)
    return Response(photo.image, media_type="image/jpeg", headers={"X-Face-Box": box, "Cache-Control": "no-store"})


DAMAGED = {"corrupt_image", "empty_image", "unsupported_image"}  # what a kept photo that no longer decodes answers


def kept_photo_crops(
    faces: list[StaleFace], margin: float, embedder: Manifest, max_pixels: int
) -> tuple[list[StaleFace], list[str], np.ndarray | None]:
    """The faces whose kept photo decodes, the ids of those whose photo does not, and the embedder's input cut from
    the photos (a whole-photo face takes no margin, as then). A damaged photo failed every call, for good."""
    readable, damaged, crops = [], [], []
    for face in faces:
        try:
            image = decode_image(face.photo.image, max_pixels, "RGB")
        except ApiError as error:
            if error.code not in DAMAGED:  # e.g. a pixel limit set below a kept region: the photo itself is fine
                raise
            damaged.append(face.id)
            continue
        readable.append(face)
        crops.append(crop_batch(image, [face.photo.box], 0.0 if face.photo.whole else margin, embedder))
    return readable, damaged, (np.concatenate(crops) if crops else None)


class ReembedResponse(BaseModel):
    gallery: str
    model: str
    version: str
    reembedded: int = Field(description="faces now embedded by this model (from the photos kept at enrollment)")
    without_photo: int = Field(description="faces of another model without a kept photo: re-enroll them")
    remaining: int = Field(description="faces with a kept photo still to re-embed; call again while it is above 0")
    damaged_photo: list[str] = Field(
        default_factory=list,
        description="faces whose kept photo no longer decodes: the photo is dropped (they count as without_photo from "
        "now on); enroll the photo again",
    )


@router.post(
    "/{g}/reembed",
    response_model=ReembedResponse,
    dependencies=[require("write")],
    summary="Re-embed faces enrolled with another model, from the photos kept at enrollment",
)
async def reembed(
    request: Request,
    g: GalleryPath,
    model: ModelQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="faces to look at in this call, oldest first")] = 200,
) -> ReembedResponse:
    """After a face-model change: re-embed up to `limit` enrolled faces with the current model, from the photos kept
    at enrollment; call again while `remaining` > 0."""
    pipeline = face_pipeline(request, model, detect=False)
    manifest = pipeline.embedder.manifest
    gallery = replica(request)
    settings = request.app.state.settings
    updates: list[tuple[str, np.ndarray]] = []
    damaged: list[str] = []
    with pipeline.in_use():  # store reads, and several batches with crops cut in between
        await require_gallery(gallery, g)
        stale, with_photo, without_photo = await gallery.store_call(
            gallery.store.stale_faces, g, manifest.name, manifest.weights_version, limit
        )
        step = pipeline.embedder.serving.max_batch_size
        for start in range(0, len(stale), step):  # bounded memory: one batch of crops at a time
            chunk = stale[start : start + step]
            readable, unreadable, batch = await image_thread(
                kept_photo_crops, chunk, pipeline.margin, manifest, settings.max_image_pixels
            )
            damaged += unreadable
            if batch is not None:
                embeddings = await embed_batch(pipeline.embedder, batch, settings)
                updates += [(face.id, vector) for face, vector in zip(readable, embeddings, strict=True)]
    done = await gallery.replace_embeddings(g, manifest.name, manifest.weights_version, updates) if updates else 0
    if damaged:  # else they would head every later page, unreadable: calls with a small limit made no progress
        await gallery.store_call(gallery.store.drop_photos, g, damaged)
    return ReembedResponse(
        gallery=g,
        model=manifest.name,
        version=manifest.weights_version,
        reembedded=done,
        remaining=with_photo - len(stale),
        without_photo=without_photo + len(damaged),
        damaged_photo=damaged,
    )


@router.post(
    "/{g}/identify",
    response_model=IdentifyResponse,
    openapi_extra=RAW_BODY_DOC,
    dependencies=[require("read")],
    summary="Who is in this photo? Every face -> the closest subjects, or unknown below the threshold",
)
async def identify(
    request: Request,
    g: GalleryPath,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    top_k: Annotated[int, Query(ge=1, le=100, description="candidates per face")] = 3,
    threshold: SimilarityQuery = None,
    far: FarQuery = None,
    max_faces: Annotated[int, Query(ge=1, le=100, description="identify at most this many faces, largest first")] = 20,
    score_threshold: ScoreQuery = None,
    min_face_size: SmallestFaceQuery = 0,
    mask: MaskQuery = False,
    file: Annotated[UploadFile | None, File(description="the photo")] = None,
) -> IdentifyResponse:
    """Every face of the photo (the `max_faces` largest) against the gallery: its `top_k` closest subjects, and the
    `match` when the best reaches the threshold (null: unknown); `mask=true` adds whether it wears a mask."""
    data = await read_image(request, file)
    pipeline = face_pipeline(request, model, detect, mask)
    decision, decided_far = pipeline.decision(threshold, far, identify=True)
    with pipeline.in_use():  # the mask detector runs after the face detector: a reload must not retire it meanwhile
        photo_faces = await find_faces(request, data, pipeline, max_faces, score_threshold, min_face_size)
    found, total = photo_faces.found, photo_faces.total
    manifest = pipeline.embedder.manifest
    gallery = replica(request)
    if found:
        queries = np.stack([f.embedding for f in found])
        try:
            results = await gallery.identify(g, manifest.name, manifest.weights_version, queries, top_k)
        except DimensionMismatch as error:
            raise not_comparable(manifest, error) from None
    else:
        await gallery.catch_up()  # so "searched" is current even when the photo has no face
        results = []
    summary = await search_summary(gallery, g, manifest, decision, decided_far)
    faces = []
    for face, matches in zip(found, results, strict=True):
        out, best = face.out(), matches_above(gallery, matches, decision)
        faces.append(IdentifiedFace(box=out.box, score=out.score, match=best.match, candidates=best.candidates, mask=face.mask))
    return IdentifyResponse(**summary.model_dump(), faces_found=total, faces=faces)


async def search_summary(
    gallery: GalleryReplica, g: str, manifest: Manifest, threshold: float, far: float | None
) -> GallerySearch:
    """What a search of ``g`` compared, after it ran; a 404 when the gallery has no subjects at all."""
    searched = gallery.size(g, manifest.name, manifest.weights_version)
    other = gallery.other_model_faces(g, manifest.name, manifest.weights_version)
    if not searched and not other:  # no faces here: ask the store whether the gallery exists at all
        await require_gallery(gallery, g)
    return GallerySearch(
        gallery=g,
        model=manifest.name,
        version=manifest.weights_version,
        threshold=threshold,
        far=far,
        searched=searched,
        other_model_faces=other,
    )


def not_comparable(manifest: Manifest, error: DimensionMismatch) -> ApiError:
    """Faces stored under this model's name that it did not make (a damaged store)."""
    return ApiError(409, "no_comparable_faces", f"the gallery's faces of {manifest.name} are not its own: {error}")


def matches_above(gallery: GalleryReplica, matches: list[Match], threshold: float) -> Matches:
    """A search's candidates, and the best of them as the match when it reaches ``threshold``."""
    candidates = [candidate(gallery, match) for match in matches]
    return Matches(match=candidates[0] if candidates and candidates[0].similarity >= threshold else None, candidates=candidates)


def without_row_values(message: str) -> str:
    """A driver's error without PostgreSQL's DETAIL lines, which quote the row ("Key (gallery, name)=(g, Jane Doe)
    already exists"): the log names people by id only. (Bound parameters are hidden by the engines already.)"""
    return "\n".join(line for line in message.splitlines() if not line.lstrip().startswith("DETAIL:"))


def install_store_error_handlers(app: FastAPI) -> None:
    """An unreachable, failing or hung store is a 503 (retry), never a 500 or a hung request (store calls give
    up after OCELLUS_GALLERY_TIMEOUT_S: ``GalleryReplica.store_call``)."""

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("ocellus.gallery").warning("gallery store unavailable: %s", without_row_values(str(exc)))
        # Our own reasons (timed out, connections busy, reloading) are told; a driver's error may name hosts.
        message = str(exc) if isinstance(exc, StoreUnavailable) else "the gallery store is unavailable; retry shortly"
        return error_response(503, "gallery_unavailable", message, {"Retry-After": "1"})

    app.add_exception_handler(SQLAlchemyError, unavailable)  # DBAPIError, and the pool's TimeoutError
    app.add_exception_handler(StoreUnavailable, unavailable)
