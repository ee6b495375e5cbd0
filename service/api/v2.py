"""Open Inference Protocol (KServe v2 / Triton HTTP) for raw tensors, so their clients work unchanged.

Supports JSON tensors and Triton's binary tensor extension (``Inference-Header-Content-Length``:
a JSON header followed by little-endian tensor bytes). Errors follow the protocol,
``{"error": "message"}`` (the app's error handler switches shape for ``/v2`` paths).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import require, run_model
from service.api.errors import ApiError
from service.repository import LoadedModel, ModelRepository

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

DATATYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"


def _repository(request: Request) -> ModelRepository:
    return request.app.state.repository


def _model(request: Request, name: str, version: str | None = None) -> LoadedModel:
    model = _repository(request).loaded.get(name)
    if model is None:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}")
    if version not in (None, "", model.manifest.version):
        raise ApiError(404, "unknown_version", f"model {name!r} has version {model.manifest.version!r}, not {version!r}")
    return model


def _dims(shape: list[Any]) -> list[int]:
    return [dim if isinstance(dim, int) else -1 for dim in shape]


def _metadata(model: LoadedModel) -> dict[str, Any]:
    session = model.model.session
    types = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64"}
    return {
        "name": model.name,
        "versions": [model.manifest.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": i.name, "datatype": types.get(i.type, i.type), "shape": _dims(i.shape)} for i in session.get_inputs()
        ],
        "outputs": [
            {"name": o.name, "datatype": types.get(o.type, o.type), "shape": _dims(o.shape)}
            for o in session.get_outputs()
            if o.name in model.model.output_names
        ],
    }


@router.get("/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server ready (at least one model loaded)")
async def ready(request: Request) -> JSONResponse:
    is_ready = bool(_repository(request).loaded)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("", summary="Server metadata", dependencies=[require("read")])
async def server_metadata() -> dict[str, Any]:
    return {"name": "ocellus", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}", dependencies=[require("read")], summary="Model metadata")
@router.get("/models/{name}/versions/{version}", dependencies=[require("read")], include_in_schema=False)
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    return _metadata(_model(request, name, version))


@router.get("/models/{name}/ready", dependencies=[require("read")], summary="Model ready")
@router.get("/models/{name}/versions/{version}/ready", dependencies=[require("read")], include_in_schema=False)
async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    model = _model(request, name, version)
    return {"name": model.name, "ready": True}


@router.get("/models/{name}/config", dependencies=[require("read")], summary="Model configuration (Triton extension)")
async def model_config(request: Request, name: str) -> dict[str, Any]:
    model = _model(request, name)
    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": request.app.state.settings.max_batch_size,
        "manifest": model.manifest.model_dump(mode="json"),
    }


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    try:
        split = int(header_length) if header_length is not None else len(body)
        if not 0 < split <= len(body):
            raise ValueError("Inference-Header-Content-Length is out of range")
        header = json.loads(body[:split])
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise ValueError("the request needs an 'inputs' list")
        return header, body[split:]
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "bad_request", f"malformed inference request: {error}") from None


def _input_tensor(spec: dict[str, Any], binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input as numpy; returns it and the new offset into the binary section."""
    try:
        name, shape, datatype = spec["name"], [int(d) for d in spec["shape"]], spec["datatype"]
    except (KeyError, TypeError, ValueError):
        raise ApiError(400, "bad_request", "each input needs name, shape and datatype") from None
    if datatype not in DATATYPES:
        raise ApiError(400, "bad_request", f"input {name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    count = int(np.prod(shape)) if shape else 1
    size = (spec.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            if offset + int(size) > len(binary) or int(size) != count * dtype.itemsize:
                raise ValueError(f"binary_data_size {size} does not fit shape {shape} of {datatype}")
            array = np.frombuffer(binary[offset : offset + int(size)], dtype=dtype).reshape(shape)
            return array, offset + int(size)
        array = np.asarray(spec["data"], dtype=dtype)
        return array.reshape(shape), offset
    except (KeyError, ValueError, TypeError) as error:
        raise ApiError(400, "bad_request", f"input {name!r}: {error}") from None


def _check_shape(model: LoadedModel, array: np.ndarray) -> None:
    expected = _dims(model.model.input_shape)
    matches = len(expected) == array.ndim and all(e in (-1, a) for e, a in zip(expected, array.shape, strict=False))
    if not matches or array.shape[0] < 1:  # the body size limit bounds the batch
        raise ApiError(400, "bad_shape", f"input shape {list(array.shape)} does not match the model's {expected}")


@router.post("/models/{name}/infer", dependencies=[require("read")], summary="Inference on raw tensors")
@router.post("/models/{name}/versions/{version}/infer", dependencies=[require("read")], include_in_schema=False)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    model = _model(request, name, version)
    with model.batcher.announce():  # a reload waits for this request to reach the batcher
        header, binary = _parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    tensors, offset, view = {}, 0, memoryview(binary)
    for spec in header["inputs"]:
        array, offset = _input_tensor(spec, view, offset)
        tensors[spec["name"]] = array
    if set(tensors) != {model.model.input_name}:
        raise ApiError(400, "bad_request", f"model {name!r} takes exactly one input, {model.model.input_name!r}")
    array = tensors[model.model.input_name]
    if array.dtype != np.float32:
        raise ApiError(400, "bad_request", f"input {model.model.input_name!r} must be FP32")
    _check_shape(model, array)
    outputs = dict(
        zip(
            model.model.output_names, await run_model(model, np.ascontiguousarray(array), request.app.state.settings), strict=True
        )
    )
    requested = header.get("outputs") or [{"name": n} for n in outputs]
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.manifest.version, "outputs": []}
    if "id" in header:
        response["id"] = header["id"]
    chunks: list[bytes] = []
    for spec in requested:
        if spec.get("name") not in outputs:
            raise ApiError(400, "bad_request", f"unknown output {spec.get('name')!r}; the model has {sorted(outputs)}")
        value = outputs[spec["name"]]
        entry = {"name": spec["name"], "datatype": NUMPY_TO_DATATYPE[value.dtype], "shape": list(value.shape)}
        if (spec.get("parameters") or {}).get("binary_data", binary_default):
            raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value.ravel().tolist()
        response["outputs"].append(entry)
    body = json.dumps(response).encode()
    if not chunks:
        return Response(body, media_type="application/json")
    return Response(
        body + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(body))},
    )
