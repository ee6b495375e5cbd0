"""``POST /v1/faces/embed`` and ``POST /v1/faces/verify``: the face pipeline over HTTP.

detect (the embedder's ``defaults.detector``, else any loaded detector with a ``face`` label) ->
square crop with the embedder's ``crop_margin`` (``service/tasks/faces.py``, the very function
training used) -> resize to the embedder's input -> embed -> L2-normalise -> cosine similarity.

``detect=false`` skips detection for photos that already are face crops: the whole photo is the
face (no margin). When a photo shows several faces, verification uses the LARGEST one in each
photo (by box area) and says how many it found; ``/embed`` returns every face, largest first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from PIL import Image
from pydantic import BaseModel, Field

from service.api.deps import (
    PLAIN_ZERO,
    RAW_BODY_DOC,
    all_or_none,
    body_doc,
    read_image,
    require,
    reserve_pixels,
    run_by_role,
    run_model,
    upload_bytes,
)
from service.api.detect import Box
from service.api.errors import ApiError
from service.api.masks import Mask, MaskQuery, mask_detector, masks_of
from service.api.schemas import ERROR_RESPONSES
from service.images import GraphPhoto, decode_for_graph, decode_image, normalise, to_array
from service.manifest import Manifest, Task
from service.repository import LoadedModel, ModelRepository
from service.settings import Settings
from service.tasks import detection
from service.tasks.faces import DEFAULT_MARGIN, FaceBox, cosine, crop_face, faces_from_outputs, is_face_detector
from service.workers import image_thread

router = APIRouter(prefix="/v1/faces", tags=["faces"], responses=ERROR_RESPONSES, dependencies=[require("infer")])

MAX_FACES_LIMIT = 100


class Face(BaseModel):
    box: Box  # in the upright photo's pixels
    score: float | None = Field(description="the detector's confidence; null with detect=false")


MASK_DOC = "with mask=true: the mask detection overlapping the face most; null: not asked, or none overlaps it"


class EmbeddedFace(Face):
    embedding: list[float]  # L2-normalised
    mask: Mask | None = Field(None, description=MASK_DOC)


class EmbedResponse(BaseModel):
    model: str
    version: str
    detector: str | None
    width: int
    height: int
    faces_found: int = Field(description="faces the detector found; `faces` holds the max_faces largest")
    faces: list[EmbeddedFace]


class VerifiedFace(Face):
    faces_found: int  # faces in that photo; the largest was compared (every_face_b: each of image_b's)


class ComparedFace(Face):
    similarity: float = Field(description="cosine similarity with image_a's face, -1..1")
    match: bool


class VerifyResponse(BaseModel):
    model: str
    version: str
    match: bool
    similarity: float = Field(description="cosine similarity of the two embeddings, -1..1")
    threshold: float = Field(description="match when similarity >= threshold")
    far: float | None = Field(description="false-accept rate the default threshold was calibrated at (on held-out pairs)")
    face_a: VerifiedFace
    face_b: VerifiedFace = Field(description="image_b's largest face (every_face_b: its face most like image_a's)")
    faces_b: list[ComparedFace] | None = Field(
        None, description="every_face_b: each face of image_b (up to 100, largest first) compared with image_a's"
    )


@dataclass
class FoundFace:
    box: tuple[float, float, float, float]
    score: float | None
    embedding: np.ndarray  # [D] float32, unit length
    mask: Mask | None = None  # with a pipeline's masker: the mask detection overlapping the face most

    def out(self) -> Face:
        x1, y1, x2, y2 = self.box
        return Face(box=Box(x1=x1, y1=y1, x2=x2, y2=y2), score=self.score)


@dataclass
class FacePipeline:
    embedder: LoadedModel
    detector: LoadedModel | None
    masker: LoadedModel | None = None  # mask=true: the mask detector

    @property
    def threshold(self) -> float:
        return float(self.embedder.manifest.defaults.get("threshold", 0.5))

    @property
    def identify_threshold(self) -> float:
        """1:N identification's default: stricter than 1:1 when the manifest says so (false matches add up over a gallery)."""
        return float(self.embedder.manifest.defaults.get("identify_threshold", self.threshold))

    def calibrated(self) -> dict[float, float]:
        """The manifest's calibrated points: false accept rate -> threshold."""
        defaults = self.embedder.manifest.defaults
        points = {float(far): float(threshold) for far, threshold in (defaults.get("far_thresholds") or {}).items()}
        for far_key, threshold_key in (("far", "threshold"), ("identify_far", "identify_threshold")):
            if defaults.get(far_key) is not None and defaults.get(threshold_key) is not None:
                points[float(defaults[far_key])] = float(defaults[threshold_key])
        return points

    def decision(self, threshold: float | None, far: float | None, identify: bool = False) -> tuple[float, float | None]:
        """The threshold to apply and its false accept rate (None when the client gave the threshold): the client's
        threshold, the calibrated one for the client's ``far``, or the route's default (1:1 or 1:N)."""
        if threshold is not None and far is not None:
            raise ApiError(422, "invalid_parameter", "give threshold or far, not both")
        if threshold is not None:
            return threshold, None
        defaults = self.embedder.manifest.defaults
        if far is None:
            if identify:  # the 1:1 rate belongs to the 1:1 threshold only: a stricter one alone has no known rate
                stricter = "identify_threshold" in defaults
                return self.identify_threshold, defaults.get("identify_far") if stricter else defaults.get("far")
            return self.threshold, defaults.get("far")
        points = self.calibrated()
        for point, value in points.items():
            if math.isclose(point, far, rel_tol=1e-6):
                return value, point
        listed = ", ".join(f"{point:g}" for point in sorted(points)) or "none"
        raise ApiError(
            422, "invalid_parameter", f"far={far:g} is not calibrated for {self.embedder.manifest.name}; it has: {listed}"
        )

    @property
    def margin(self) -> float:
        return float(self.embedder.manifest.defaults.get("crop_margin", DEFAULT_MARGIN))

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """For a request that awaits other work (the store, a second photo) before or between its model runs:
        a reload retires these models only after it."""
        with ExitStack() as stack:
            for model in (self.embedder, self.detector, self.masker):
                if model is not None:
                    stack.enter_context(model.batcher.in_use())
            yield


def embedding_size(embedder: LoadedModel) -> int | None:
    """The length of the model's embeddings: its manifest's, else its graph's when fixed."""
    size = embedder.manifest.defaults.get("embedding_size")
    if size is None:
        shape = embedder.model.session.get_outputs()[0].shape
        size = shape[-1] if shape and isinstance(shape[-1], int) else None
    return size


def face_pipeline(request: Request, model: str | None, detect: bool, mask: bool = False) -> FacePipeline:
    """The embedder (``model`` or the default), when detecting its face detector, and when asked the mask detector
    (503s before any work when one is missing)."""
    repository: ModelRepository = request.app.state.repository
    embedder = repository.get(model, Task.face_embedding)
    masker = mask_detector(request) if mask else None
    if not detect:
        # The whole photo is the face: a detection threshold or a smallest face would be ignored without a word.
        if ignored := [name for name in ("score_threshold", "min_face_size") if name in request.query_params]:
            raise ApiError(
                422, "invalid_parameter", f"{ignored[0]} applies to detected faces; detect=false embeds the whole photo"
            )
        return FacePipeline(embedder, None, masker)
    wanted = embedder.manifest.defaults.get("detector")
    if wanted:  # its thresholds were calibrated on that detector's crops: another one, silently, would shift them
        detector = repository.loaded.get(wanted)
        if detector is None or not is_face_detector(detector.manifest):
            message = f"{embedder.name}'s face detector {wanted!r} is not loaded; detect=false embeds the whole photo"
            raise ApiError(503, "no_face_detector", message)
        return FacePipeline(embedder, detector, masker)
    detector = next((m for _, m in sorted(repository.loaded.items()) if is_face_detector(m.manifest)), None)
    if detector is None:
        raise ApiError(503, "no_face_detector", "no face detector is loaded (a detection model with a 'face' label)")
    return FacePipeline(embedder, detector, masker)


BoxXYXY = tuple[float, float, float, float]


def crop_batch(image: Image.Image, boxes: list[BoxXYXY], margin: float, embedder: Manifest) -> np.ndarray:
    """The embedder's input for the faces in ``boxes`` of ``image``."""
    spec = embedder.input
    assert spec.size is not None
    mode = "L" if spec.color == "GRAY" else "RGB"
    crops = [crop_face(image, box, margin, spec.size).convert(mode) for box in boxes]
    return np.concatenate([normalise(to_array(crop), spec.mean, spec.std)[None] for crop in crops])


async def embed_batch(embedder: LoadedModel, batch: np.ndarray, settings: Settings) -> np.ndarray:
    """``[n, D]`` unit-length embeddings of a crop batch."""
    (embeddings,) = await run_model(embedder, batch, settings)
    embeddings = embeddings.reshape(len(batch), -1).astype(np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


@dataclass
class PhotoFaces:
    """What :func:`find_faces` saw in a photo."""

    size: tuple[int, int]  # the upright photo's width and height
    photo: Image.Image | None  # the upright photo in colour, decoded whole only when a face was found in it
    found: list[FoundFace]
    total: int  # how many faces it has (``found`` may hold fewer: max_faces)


def shorter_side(box: tuple[float, float, float, float]) -> float:
    """A face box's shorter side, in photo pixels (what min_face_size compares)."""
    x1, y1, x2, y2 = box
    return min(x2 - x1, y2 - y1)


async def find_faces(
    request: Request,
    data: bytes,
    pipeline: FacePipeline,
    max_faces: int,
    score_threshold: float | None = None,
    min_face_size: int = 0,
) -> PhotoFaces:
    """The photo's ``max_faces`` largest faces embedded (largest first), and how many it has (faces whose shorter
    side is under ``min_face_size`` photo pixels are left out)."""
    settings: Settings = request.app.state.settings
    detector = pipeline.detector
    await reserve_pixels(request, data)  # (verify took both of its photos' already)
    with pipeline.embedder.batcher.announce():
        if detector is None:
            image = await image_thread(decode_image, data, settings.max_image_pixels, "RGB")
            size, boxes, margin = image.size, [FaceBox((0.0, 0.0, float(image.width), float(image.height)), None)], 0.0
        else:
            with detector.batcher.announce():
                seen, inputs, placed = await image_thread(detector_input, data, detector.manifest, settings.max_image_pixels)
            outputs = await run_by_role(detector, inputs, settings)
            boxes = faces_from_outputs(
                outputs["boxes"][0], outputs["scores"][0], placed, detector.manifest, score_threshold, seen.span
            )
            size, boxes, margin = seen.size, [face for face in boxes if shorter_side(face.box) >= min_face_size], pipeline.margin
        total, boxes = len(boxes), boxes[:max_faces]
        if not boxes:
            return PhotoFaces(size, None, [], total)
        if detector is not None:  # the crops are colour, from the whole photo
            image = await image_thread(seen.in_colour, data, settings.max_image_pixels)
        places = [face.box for face in boxes]
        batch = await image_thread(crop_batch, image, places, margin, pipeline.embedder.manifest)
    if pipeline.masker is None:
        embeddings, masks = await embed_batch(pipeline.embedder, batch, settings), [None] * len(boxes)
    else:  # both models at once
        embeddings, masks = await all_or_none(
            embed_batch(pipeline.embedder, batch, settings), masks_of(request, pipeline.masker, image, places)
        )
    found = [FoundFace(face.box, face.score, vector, mask) for face, vector, mask in zip(boxes, embeddings, masks, strict=True)]
    return PhotoFaces(size, image, found, total)


def detector_input(data: bytes, detector: Manifest, max_pixels: int) -> tuple[GraphPhoto, np.ndarray, detection.Letterbox]:
    """The photo decoded as /v1/detect decodes it (a large JPEG drafted), so that both find the same faces, and the
    detector's input made from it."""
    seen = decode_for_graph(data, max_pixels, detector.input.color, detector.input.size, keep_photo=False)
    inputs, placed = detection.preprocess(seen.image, detector)
    return seen, inputs, placed


ModelQuery = Annotated[str | None, Query(description="face-embedding model; default: OCELLUS_DEFAULT_MODELS or the first loaded")]
DetectQuery = Annotated[bool, Query(description="false: the photo is already a face crop (no detection, no margin)")]
SimilarityQuery = Annotated[
    float | None,
    Query(ge=-1.0, le=1.0, allow_inf_nan=False, description="cosine similarity needed to match; default: the model's"),
    PLAIN_ZERO,
]
FarQuery = Annotated[
    float | None,
    Query(
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="pick the model's threshold calibrated at this false accept rate (instead of threshold)",
    ),
]
SmallestFaceQuery = Annotated[
    int,
    Query(ge=0, le=10_000, description="leave out faces whose shorter side is under this many photo pixels (0: keep all)"),
]
ScoreQuery = Annotated[
    float | None,
    Query(ge=0.0, le=1.0, allow_inf_nan=False, description="face detection score threshold; default: the detector's"),
]


@router.post("/embed", response_model=EmbedResponse, openapi_extra=RAW_BODY_DOC, summary="Find every face and embed it")
async def embed(
    request: Request,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    max_faces: Annotated[int, Query(ge=1, le=MAX_FACES_LIMIT, description="embed at most this many faces, largest first")] = 20,
    score_threshold: ScoreQuery = None,
    min_face_size: SmallestFaceQuery = 0,
    mask: MaskQuery = False,
    file: Annotated[UploadFile | None, File(description="the photo")] = None,
) -> EmbedResponse:
    """The faces found (the `max_faces` largest, largest first): each one's box, the detector's score and its
    L2-normalised embedding (compare two by cosine similarity). `detect=false` takes the whole photo as the face;
    `mask=true` adds whether it wears a mask."""
    data = await read_image(request, file)
    pipeline = face_pipeline(request, model, detect, mask)
    with pipeline.in_use():  # the mask detector runs after the face detector: a reload must not retire it meanwhile
        faces = await find_faces(request, data, pipeline, max_faces, score_threshold, min_face_size)
    width, height = faces.size
    manifest = pipeline.embedder.manifest
    return EmbedResponse(
        model=manifest.name,
        version=manifest.weights_version,
        detector=pipeline.detector.name if pipeline.detector else None,
        width=width,
        height=height,
        faces_found=faces.total,
        faces=[EmbeddedFace(**f.out().model_dump(), embedding=f.embedding.tolist(), mask=f.mask) for f in faces.found],
    )


async def largest_faces(
    request: Request,
    data: bytes,
    pipeline: FacePipeline,
    which: str,
    score: float | None,
    min_face_size: int = 0,
    count: int = 1,
) -> tuple[list[FoundFace], int]:
    """The photo's ``count`` largest faces (largest first) and how many it has; 422 ``no_face`` when it has none."""
    faces = await find_faces(request, data, pipeline, count, score, min_face_size)
    if not faces.found:
        size = f" of {min_face_size} px or more" if min_face_size else ""
        raise ApiError(422, "no_face", f"no face{size} was found in {which}")
    return faces.found, faces.total


async def largest_face(
    request: Request, data: bytes, pipeline: FacePipeline, which: str, score: float | None, min_face_size: int = 0
) -> tuple[FoundFace, int]:
    found, total = await largest_faces(request, data, pipeline, which, score, min_face_size)
    return found[0], total


@router.post(
    "/verify",
    response_model=VerifyResponse,
    openapi_extra=body_doc("image_a", "image_b"),
    summary="Do two photos show the same person? (largest face of each, or image_a's among every face of image_b)",
)
async def verify(
    request: Request,
    model: ModelQuery = None,
    detect: DetectQuery = True,
    threshold: SimilarityQuery = None,
    far: FarQuery = None,
    score_threshold: ScoreQuery = None,
    min_face_size: SmallestFaceQuery = 0,
    every_face_b: Annotated[
        bool,
        Query(description="compare image_a's face with every face of image_b (a group photo): is that person among them?"),
    ] = False,
    # Optional to FastAPI only: a JSON body carries them instead (upload_bytes answers missing_file for either)
    image_a: Annotated[UploadFile | None, File(description="first photo")] = None,
    image_b: Annotated[UploadFile | None, File(description="second photo")] = None,
) -> VerifyResponse:
    """Are the faces of `image_a` and `image_b` the same person? The largest face of each photo is compared; `match`
    is `similarity >= threshold`: the model's calibrated default, the one calibrated at `far`, or `threshold` itself.
    With `every_face_b`, image_a's face is compared with each face of image_b (CompreFace's verify) at the identify
    threshold by default (1:N, as a gallery search; `threshold` and `far` as above): `faces_b` lists them, and
    `match`, `similarity` and `face_b` are those of the most similar."""
    data_a = await upload_bytes(request, image_a, "image_a", raw_body=False)
    data_b = await upload_bytes(request, image_b, "image_b", raw_body=False)
    pipeline = face_pipeline(request, model, detect)
    # Against every face of a group photo, as identify searches a gallery: its stricter 1:N threshold by default (at
    # the 1:1 one, 100 strangers pass 1 - (1 - far)^100 of the time, 9.5 % at far=0.001).
    decision, decided_far = pipeline.decision(threshold, far, identify=every_face_b)
    await reserve_pixels(request, data_a, data_b)
    with pipeline.in_use():  # the two photos' tasks start a loop turn later
        (face_a, count_a), (faces_b, count_b) = await all_or_none(
            largest_face(request, data_a, pipeline, "image_a", score_threshold, min_face_size),
            largest_faces(
                request, data_b, pipeline, "image_b", score_threshold, min_face_size, MAX_FACES_LIMIT if every_face_b else 1
            ),
        )
    similarities = [cosine(face_a.embedding @ face.embedding) for face in faces_b]
    best = int(np.argmax(similarities))  # (the largest face, when it is the only one compared)
    manifest = pipeline.embedder.manifest
    compared = [
        ComparedFace(**face.out().model_dump(), similarity=value, match=value >= decision)
        for face, value in zip(faces_b, similarities, strict=True)
    ]
    return VerifyResponse(
        model=manifest.name,
        version=manifest.weights_version,
        match=similarities[best] >= decision,
        similarity=similarities[best],
        threshold=decision,
        far=decided_far,
        face_a=VerifiedFace(**face_a.out().model_dump(), faces_found=count_a),
        face_b=VerifiedFace(**faces_b[best].out().model_dump(), faces_found=count_b),
        faces_b=compared if every_face_b else None,
    )
