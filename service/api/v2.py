"""Open Inference Protocol (KServe v2 / Triton HTTP) for raw tensors, so their clients work unchanged.

Supports JSON tensors and Triton's binary tensor extension (``Inference-Header-Content-Length``:
a JSON header followed by little-endian tensor bytes). Errors follow the protocol,
``{"error": "message"}`` (the app's error handler switches shape for ``/v2`` paths).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import asdict
from typing import Annotated, Any, NamedTuple

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.deps import require, run_model
from service.api.errors import ERROR_CODE_HEADER, ApiError
from service.api.schemas import error_responses
from service.repository import LoadedModel, ModelRepository
from service.runtime import Duration
from service.settings import Settings
from service.tasks.denoising import RUN_PIXELS
from service.workers import image_thread


class V2Error(BaseModel):
    error: str  # the protocol's error body; the code travels in the X-Error-Code header


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool  # also the body of the 503 while no model is loaded (the protocol's readiness answer)


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1 for a free dimension


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2ModelReady(BaseModel):
    name: str
    ready: bool


# What /v2 answers instead of FastAPI's default 422 schema (the app's error handler switches shape for /v2).
V2_ERRORS = error_responses(
    V2Error,
    {
        400: "a bad request: wrong shape, datatype, input or output name, NaN/inf, batch over max_batch_size",
        401: "API key required",
        403: "API key's role too weak",
        404: "unknown model or version",
        408: "the body did not arrive within OCELLUS_BODY_TIMEOUT_S",
        413: "request body too large",
        422: "invalid parameter",
        500: "inference_failed: ONNX Runtime failed on the model",
        501: "unsupported_datatype: an output of a type the protocol lacks",
        503: "model failed to load, or overloaded (Retry-After)",
    },
)
router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=V2_ERRORS)

# The protocol's tensor types (all but BYTES), and the same as ONNX Runtime names them ("tensor(float)"...).
DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
ORT_NAMES = {"FP16": "float16", "FP32": "float", "FP64": "double"}
ORT_TO_DATATYPE = {f"tensor({ORT_NAMES.get(k, np.dtype(v).name)})": k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"


def _repository(request: Request) -> ModelRepository:
    return request.app.state.repository


def _model(request: Request, name: str, version: str | None = None) -> LoadedModel:
    repository = _repository(request)
    model = repository.loaded.get(name)
    if model is None and name in repository.failed:
        raise ApiError(503, "model_unavailable", f"model {name!r} failed to load: {repository.failed[name].error}")
    if model is None:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}")
    if version not in (None, "", model.manifest.version):
        raise ApiError(404, "unknown_version", f"model {name!r} has version {model.manifest.version!r}, not {version!r}")
    return model


def _dims(shape: list[Any]) -> list[int]:
    """Free dimensions as -1; the batch always (a graph with a fixed batch runs any batch in slices)."""
    return [dim if isinstance(dim, int) and axis else -1 for axis, dim in enumerate(shape)]


def _metadata(model: LoadedModel) -> dict[str, Any]:
    session = model.model.session
    return {
        "name": model.name,
        "versions": [model.manifest.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": i.name, "datatype": ORT_TO_DATATYPE.get(i.type, i.type), "shape": _dims(i.shape)}
            for i in session.get_inputs()
        ],
        "outputs": [
            {"name": o.name, "datatype": ORT_TO_DATATYPE.get(o.type, o.type), "shape": _dims(o.shape)}
            for o in session.get_outputs()
            if o.name in model.model.output_names
        ],
    }


@router.get("/health/live", summary="Server live", response_model=V2Live)
@router.head("/health/live", include_in_schema=False)
async def live() -> dict[str, bool]:
    return {"live": True}


# Not ready is answered {"ready": false}, not the router's V2Error; a request cut off by shutdown still gets a V2Error.
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": V2Ready | V2Error, "description": 'no model is loaded ({"ready": false}), or shutting down'}
}


@router.get("/health/ready", summary="Server ready (at least one model loaded)", response_model=V2Ready, responses=NOT_READY)
@router.head("/health/ready", include_in_schema=False)
async def ready(request: Request) -> JSONResponse:
    is_ready = bool(_repository(request).loaded)
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503, None if is_ready else {ERROR_CODE_HEADER: "not_ready"})


@router.get("", summary="Server metadata", dependencies=[require("infer")], response_model=V2ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    return {"name": "ocellus", "version": "0.1.0", "extensions": ["binary_tensor_data", "statistics"]}


def _statistics(model: LoadedModel) -> dict[str, Any]:
    """Triton's statistics extension for one model (since it was loaded; a reload that replaces it starts over).
    Decoding and pre-processing happen before a request is queued: compute_input and compute_output stay 0."""
    stats, zero = model.batcher.statistics, asdict(Duration())
    return {
        "name": model.name,
        "version": model.manifest.version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": asdict(stats.success),
            "fail": asdict(stats.fail),
            "queue": asdict(stats.queue),
            "compute_input": zero,
            "compute_infer": asdict(stats.compute_infer),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": zero, "compute_infer": asdict(runs), "compute_output": zero}
            for size, runs in sorted(stats.batches.items())
        ],
    }


# Before /models/{name}: "stats" is not a model's name here.
@router.get("/models/stats", dependencies=[require("infer")], summary="Every loaded model's statistics (Triton extension)")
async def all_statistics(request: Request) -> dict[str, Any]:
    return {"model_stats": [_statistics(model) for _, model in sorted(_repository(request).loaded.items())]}


@router.get("/models/{name}/stats", dependencies=[require("infer")], summary="A model's statistics (Triton extension)")
async def model_statistics(request: Request, name: str) -> dict[str, Any]:
    return {"model_stats": [_statistics(_model(request, name))]}


@router.get("/models/{name}/versions/{version}/stats", dependencies=[require("infer")], include_in_schema=False)
async def model_version_statistics(request: Request, name: str, version: str) -> dict[str, Any]:
    return {"model_stats": [_statistics(_model(request, name, version))]}


# Each versioned path (which clients call when given a model_version) has its own small handler, out of
# the schema: a shared handler would document a stray `version` query parameter on the plain path.
@router.get("/models/{name}", dependencies=[require("infer")], summary="Model metadata", response_model=V2ModelMetadata)
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(_model(request, name))


@router.get("/models/{name}/versions/{version}", dependencies=[require("infer")], include_in_schema=False)
async def model_version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(_model(request, name, version))


@router.get("/models/{name}/ready", dependencies=[require("infer")], summary="Model ready", response_model=V2ModelReady)
async def model_ready(request: Request, name: str) -> dict[str, Any]:
    return {"name": _model(request, name).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", dependencies=[require("infer")], include_in_schema=False)
async def model_version_ready(request: Request, name: str, version: str) -> dict[str, Any]:
    return {"name": _model(request, name, version).name, "ready": True}


@router.post("/repository/index", dependencies=[require("infer")], summary="Model repository index (Triton extension)")
async def repository_index(request: Request) -> list[dict[str, str]]:
    repository = _repository(request)
    index = [{"name": name, "version": model.manifest.version, "state": "READY"} for name, model in repository.loaded.items()]
    index += [{"name": name, "state": "UNAVAILABLE", "reason": failed.error} for name, failed in repository.failed.items()]
    return sorted(index, key=lambda entry: entry["name"])


@router.get("/models/{name}/config", dependencies=[require("infer")], summary="Model configuration (Triton extension)")
async def model_config(request: Request, name: str) -> dict[str, Any]:
    return _config(_model(request, name))


@router.get("/models/{name}/versions/{version}/config", dependencies=[require("infer")], include_in_schema=False)
async def model_version_config(request: Request, name: str, version: str) -> dict[str, Any]:
    return _config(_model(request, name, version))


def _config(model: LoadedModel) -> dict[str, Any]:
    metadata = _metadata(model)

    def tensors(kind: str) -> list[dict[str, Any]]:  # Triton's form: TYPE_ names, dims without the batch axis
        return [{"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]} for t in metadata[kind]]

    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": model.serving.max_batch_size,
        "input": tensors("inputs"),
        "output": tensors("outputs"),
        "manifest": model.manifest.model_dump(mode="json"),
    }


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # "1" is not a dimension and "yes" is not a boolean


class TensorParameters(Strict):
    binary_data_size: int | None = Field(None, ge=0)


MAX_OBJECTS = 64  # a request's JSON objects: itself, its input and outputs (at most a few) and their parameters

# More axes than any image graph has; a longer shape is refused before math.prod over it (quadratic in its
# length, holding the GIL: a million axes, a 2 MB body, stalled the server ~20 s here).
MAX_AXES = 8


class RequestInput(Strict):
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_AXES)
    datatype: str
    data: list[Any] | None = None
    parameters: TensorParameters | None = None


class OutputParameters(Strict):
    binary_data: bool | None = None
    classification: int | None = None  # Triton's classification extension (tritonclient's class_count): refused


class RequestOutput(Strict):
    name: str
    parameters: OutputParameters | None = None


class RequestParameters(Strict):
    binary_data_output: bool = False


class InferenceRequest(Strict):
    """The protocol's request header; unknown fields are ignored, wrong types are a 400."""

    id: str | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None
    parameters: RequestParameters | None = None


def _parse_request(body: bytes, header_length: str | None, most: JsonBudget) -> tuple[InferenceRequest, bytes]:
    try:
        if header_length is not None and not re.fullmatch(r"[0-9]{1,12}", header_length.strip()):
            raise ValueError(f"Inference-Header-Content-Length must be a byte count, not {header_length[:20]!r}")
        if not body:  # not "Inference-Header-Content-Length is out of range" when none was sent
            raise ValueError("the body is empty: send the JSON request (then any binary tensor data)")
        split = int(header_length) if header_length is not None else len(body)  # int() alone takes "+1_9"
        if not 0 < split <= len(body):
            raise ValueError("Inference-Header-Content-Length is out of range")
        header = body[:split]
        # Counted before parsing: 25 MB of "[]," (25 kB gzipped) parsed into 8.7 million lists, 1 GB and seconds of
        # CPU holding the GIL per request; "1.5," or "{}," into 6-8 million values (~230 MB): the byte limit alone
        # bounded neither. (Commas: one fewer than the values of each list or object.) Up to twice the largest input
        # is parsed, so that a batch a little too large is told its batch limit, further on.
        if (lists := header.count(b"[")) > 2 * most.lists:
            raise ValueError(f"{lists:,} JSON lists, where this model's largest input nests in {most.lists:,}")
        if (values := header.count(b",")) > 2 * most.values:
            raise ValueError(f"{values:,} JSON values, where this model's largest input holds {most.values:,}")
        # Objects: the request, its inputs, outputs and their parameters. A free-size graph's value budget (millions)
        # let 7.9 million "{}" through to the parser (~0.8 GB).
        if (objects := header.count(b"{")) > MAX_OBJECTS:
            raise ValueError(f"{objects:,} JSON objects, where a request holds at most {MAX_OBJECTS}")
        return InferenceRequest.model_validate_json(header), body[split:]
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        raise ApiError(400, "bad_request", f"malformed inference request: {where}: {problem['msg']}") from None
    except ValueError as error:
        raise ApiError(400, "bad_request", f"malformed inference request: {error}") from None


def _decoded_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate body (tritonclient's request_compression_algorithm) inflated, at most ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r}: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise ApiError(400, "bad_request", f"the {encoding} body does not inflate: {error}") from None
    if len(inflated) > limit:  # a compression bomb stops here, never inflated in full
        raise ApiError(413, "payload_too_large", f"the inflated request body exceeds {limit:,} bytes")
    if not inflater.eof or inflater.unused_data:
        raise ApiError(400, "bad_request", f"the {encoding} body is cut short or followed by other bytes")
    return inflated


def _input_tensor(spec: RequestInput, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input as numpy; returns it and the new offset into the binary section."""
    if spec.datatype not in DATATYPES:
        raise ApiError(400, "bad_request", f"input {spec.name!r}: unsupported datatype {spec.datatype!r}")
    dtype = np.dtype(DATATYPES[spec.datatype]).newbyteorder("<")
    count = math.prod(spec.shape)
    size = spec.parameters.binary_data_size if spec.parameters else None
    try:
        if size is not None:
            if spec.data is not None:
                raise ValueError("both data and binary_data_size: send one")
            if size != count * dtype.itemsize:
                raise ValueError(f"binary_data_size {size} does not fit shape {spec.shape} of {spec.datatype}")
            if offset + size > len(binary):  # a JSON-only body, or one whose header length is off
                follow = f"only {len(binary) - offset} bytes follow" if len(binary) > offset else "no binary data follows"
                raise ValueError(
                    f"binary_data_size {size}, but {follow} the JSON header (its length: Inference-Header-Content-Length)"
                )
            return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(spec.shape), offset + size
        if spec.data is None:
            raise ValueError("no data and no binary_data_size")
        values = np.asarray(spec.data)  # numbers only: strings, null and booleans are not FP32 (or INT) data
        wanted = "booleans" if spec.datatype == "BOOL" else "numbers"
        if values.dtype.kind not in ("b" if spec.datatype == "BOOL" else "iuf") and values.size:
            raise ValueError(f"data must be {wanted}")
        if values.dtype.kind != "b" and _holds_boolean(spec.data):  # numpy reads [true, 0.5] as [1.0, 0.5]
            raise ValueError(f"data must be {wanted}, not true or false")
        with np.errstate(over="raise", invalid="raise"):
            return values.astype(dtype).reshape(spec.shape), offset
    except (ValueError, TypeError, OverflowError, FloatingPointError) as error:
        raise ApiError(400, "bad_request", f"input {spec.name!r}: {error}") from None


def _holds_boolean(data: list[Any]) -> bool:
    """Whether nested lists hold a JSON true or false (2.4 ms for 98,304 numbers here; parsing them took 7-18 ms)."""
    pending = [data]
    while pending:
        for item in pending.pop():
            if item.__class__ is list:
                pending.append(item)
            elif item.__class__ is bool:
                return True
    return False


def _check_shape(model: LoadedModel, array: np.ndarray) -> None:
    expected = _dims(model.model.input_shape)
    matches = len(expected) == array.ndim and all(e in (-1, a) for e, a in zip(expected, array.shape, strict=False))
    if not matches or array.shape[0] < 1:  # the body size limit bounds the batch
        raise ApiError(400, "bad_shape", f"input shape {list(array.shape)} does not match the model's {expected}")
    # Fully convolutional graphs (free height/width) take sizes in multiples of their stride only.
    stride = model.manifest.stride
    if array.ndim == 4 and any(side < stride or side % stride for side in array.shape[2:]):
        sides = list(array.shape[2:])
        raise ApiError(400, "bad_shape", f"height and width must be positive multiples of {stride} for {model.name}, not {sides}")


def _request_tensor(
    raw: bytes, encoding: str | None, header_length: str | None, model: LoadedModel, settings: Settings
) -> tuple[InferenceRequest, np.ndarray]:
    """The request's header and its one input as a contiguous FP32 array, every check passed."""
    header, binary = _parse_request(_decoded_body(raw, encoding, settings.max_upload_bytes), header_length, _json_budget(model))
    if [spec.name for spec in header.inputs] != [model.model.input_name]:
        raise ApiError(400, "bad_request", f"model {model.name!r} takes exactly one input, {model.model.input_name!r}")
    (spec,) = header.inputs
    most = model.serving.max_batch_size
    if spec.shape and spec.shape[0] > most:  # before any array exists: memory stays bounded
        raise ApiError(400, "bad_shape", f"a batch of {spec.shape[0]} exceeds max_batch_size {most} of {model.name}: split it")
    _check_pixels(model, spec.shape)
    array, offset = _input_tensor(spec, memoryview(binary), 0)
    if offset != len(binary):
        raise ApiError(400, "bad_request", f"{len(binary) - offset} bytes follow the last tensor's binary data")
    if array.dtype != np.float32:
        raise ApiError(400, "bad_request", f"input {model.model.input_name!r} must be FP32")
    if not np.isfinite(array).all():
        raise ApiError(400, "bad_request", f"input {model.model.input_name!r} has NaN or infinite values")
    _check_shape(model, array)
    for requested_output in header.outputs or []:
        if requested_output.parameters and requested_output.parameters.classification is not None:
            raise ApiError(400, "bad_request", "the classification extension (class_count) is not supported; use /v1/classify")
    names = [output.name for output in header.outputs or []]
    if len(set(names)) != len(names):
        raise ApiError(400, "bad_request", f"an output is requested twice: {names}")
    unknown = [n for n in names if n not in model.model.output_names]
    if unknown:  # before the run, not after it
        raise ApiError(400, "bad_request", f"unknown output {unknown[0]!r}; the model has {sorted(model.model.output_names)}")
    return header, np.ascontiguousarray(array)


class JsonBudget(NamedTuple):
    lists: int
    values: int


def _json_budget(model: LoadedModel) -> JsonBudget:
    """The JSON lists and values of a request of the largest input the model takes, its data nested one list per
    axis (an [N, C, H, W] tensor: 1 + N + N*C + N*C*H lists; flat data, one), with room for the rest of the header."""
    sizes = [model.serving.max_batch_size, *_dims(model.model.input_shape)[1:]]
    lists, rows = 1, 1
    for size in sizes[:-1]:
        # A free side: RUN_PIXELS bounds a request's samples x pixels (_check_pixels), each row holding at least a stride.
        rows = rows * size if size > 0 else rows // sizes[0] * max(sizes[0], RUN_PIXELS // model.manifest.stride)
        lists += rows
    fixed = math.prod(size for size in sizes[1:] if size > 0)
    numbers = fixed * (RUN_PIXELS if min(sizes[1:], default=1) < 1 else sizes[0])
    return JsonBudget(lists + 64, numbers + lists + 256)


def _check_pixels(model: LoadedModel, shape: list[int]) -> None:
    """A graph of free height and width takes at most what /v1/denoise runs at once (``RUN_PIXELS`` samples x pixels)
    per request: ONNX Runtime's arena kept the memory of its largest run for good (an 8 kB gzipped 2048x2048
    request kept 2.2 GB)."""
    free = len(shape) == 4 and _dims(model.model.input_shape)[2:] == [-1, -1]
    if free and (pixels := shape[0] * shape[2] * shape[3]) > RUN_PIXELS:
        raise ApiError(
            400,
            "bad_shape",
            f"{pixels:,} samples x pixels exceed {RUN_PIXELS:,} per request for {model.name}: split the batch or tile "
            "the image (/v1/denoise and /v1/segment take whole photos of any size)",
        )


def _response_body(header: InferenceRequest, model: LoadedModel, outputs: dict[str, np.ndarray]) -> tuple[bytes, list[bytes]]:
    """The JSON response and the binary outputs that follow it (Triton's binary extension)."""
    requested = header.outputs or [RequestOutput(name=n) for n in outputs]
    binary_default = header.parameters.binary_data_output if header.parameters else False
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.manifest.version, "outputs": []}
    if header.id is not None:
        response["id"] = header.id
    chunks: list[bytes] = []
    for wanted in requested:
        value = outputs[wanted.name]
        if value.dtype not in NUMPY_TO_DATATYPE:  # strings, or a type the protocol lacks
            raise ApiError(501, "unsupported_datatype", f"output {wanted.name!r} is {value.dtype}, which /v2 does not send")
        entry: dict[str, Any] = {"name": wanted.name, "datatype": NUMPY_TO_DATATYPE[value.dtype], "shape": list(value.shape)}
        chosen = wanted.parameters.binary_data if wanted.parameters else None
        if binary_default if chosen is None else chosen:
            raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif value.dtype.kind == "f" and not np.isfinite(value).all():  # json.dumps would write NaN, which is not JSON
            message = f"output {wanted.name!r} holds NaN or infinite values, which JSON cannot carry: ask for it as binary_data"
            raise ApiError(422, "invalid_parameter", message)
        else:
            entry["data"] = value.ravel().tolist()
        response["outputs"].append(entry)
    return json.dumps(response).encode(), chunks


@router.post(
    "/models/{name}/infer",
    dependencies=[require("infer")],
    summary="Inference on raw tensors",
    responses={
        200: {
            "description": "the protocol's JSON response; with binary outputs, that JSON then the tensors' bytes "
            "(application/octet-stream), the JSON's length in Inference-Header-Content-Length",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        415: {"model": V2Error, "description": "a Content-Encoding other than gzip, deflate or identity"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the protocol's JSON request (inputs with name, shape, datatype FP32, data), or Triton's "
            "binary form: that JSON, then the tensor bytes, its length in Inference-Header-Content-Length",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
        }
    },
)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", dependencies=[require("infer")], include_in_schema=False)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    _model(request, name, version)  # an unknown model is refused before its body is read ...
    settings = request.app.state.settings
    raw = await request.body()
    model = _model(request, name, version)  # ... and the model is taken after: a slow upload never holds up a reload
    # Inflating, parsing (up to millions of JSON numbers) and encoding run in worker threads, off the event loop.
    with model.batcher.announce():  # a reload waits for this request to reach the batcher
        encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)
        header, array = await image_thread(_request_tensor, raw, encoding, header_length, model, settings)
    outputs = dict(zip(model.model.output_names, await run_model(model, array, settings, finite=False), strict=True))
    body, chunks = await image_thread(_response_body, header, model, outputs)
    if not chunks:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(body))},
    )
