"""Open Inference Protocol (KServe v2) driven by the real Triton HTTP client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.images import decode_image
from service.manifest import Manifest
from service.tasks.classification import preprocess
from tests.conftest import CLASSIFIER, MODELS, LiveServer, cifar_photo


@pytest.fixture()
def client(server: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


def photos_tensor(labels: list[str]) -> np.ndarray:
    manifest = Manifest.read(MODELS / CLASSIFIER)
    return np.concatenate([preprocess(decode_image(cifar_photo(label).read_bytes(), 10**8), manifest) for label in labels])


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "ocellus"
    assert client.is_model_ready(CLASSIFIER)
    metadata = client.get_model_metadata(CLASSIFIER)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert metadata["outputs"][0]["name"] == "logits" and metadata["outputs"][0]["shape"][-1] == 10


@pytest.mark.parametrize("binary", [True, False])
def test_infer_fp32_batch_matches_the_classify_endpoint(
    client: triton.InferenceServerClient, server: LiveServer, binary: bool
) -> None:
    labels = ["cat", "ship", "airplane", "truck"]
    tensor = photos_tensor(labels)
    request = triton.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor, binary_data=binary)
    result = client.infer(
        CLASSIFIER, [request], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)], request_id="abc"
    )
    logits = result.as_numpy("logits")
    assert logits.shape == (4, 10) and result.get_response()["id"] == "abc"
    manifest = Manifest.read(MODELS / CLASSIFIER)
    with server.client() as http:
        for label, row in zip(labels, logits, strict=True):
            expected = http.post("/v1/classify", files={"file": cifar_photo(label).open("rb")}).json()["predictions"][0]
            assert manifest.labels[int(row.argmax())] == expected["label"]


def test_wrong_shape_and_unknown_model_are_protocol_errors(client: triton.InferenceServerClient) -> None:
    wrong = np.zeros((1, 3, 30, 32), np.float32)
    request = triton.InferInput("input", list(wrong.shape), "FP32")
    request.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(CLASSIFIER, [request])
    assert raised.value.status() == "400" and "shape" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("nope")
    assert raised.value.status() == "404"
    ints = triton.InferInput("input", [1, 3, 32, 32], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.int32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(CLASSIFIER, [ints])
    assert raised.value.status() == "400"


ZEROS = [0.0] * (3 * 32 * 32)


@pytest.mark.parametrize(
    "header",
    [
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ZEROS, "parameters": [1]}]},
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ZEROS}], "parameters": [1]},
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ZEROS}], "outputs": "logits"},
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ZEROS}], "outputs": [1]},
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": ["FP32"], "data": ZEROS}]},
        {"inputs": [{"name": ["input"], "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ZEROS}]},
        b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": 1e400}}]}',
        b'{"inputs": [',
        {"inputs": [{"name": "input", "shape": [1, 3, 32, -32], "datatype": "FP32", "data": ZEROS}]},
        {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}]},
        {"inputs": []},
        [1, 2],
    ],
)
def test_malformed_inference_headers_are_400s_not_500s(server: LiveServer, header: object) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    with server.client() as http:
        response = http.post(f"/v2/models/{CLASSIFIER}/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("side", [3, 33])
def test_fully_convolutional_models_refuse_sizes_off_their_stride(server: LiveServer, side: int) -> None:
    header = {"inputs": [{"name": "input", "shape": [1, 1, side, side], "datatype": "FP32", "data": [0.5] * side * side}]}
    with server.client() as http:
        response = http.post("/v2/models/bsd-denoiser-unet/infer", json=header)
        assert response.status_code == 400 and "multiples of 4" in response.json()["error"]
        header["inputs"][0].update(shape=[1, 1, 8, 8], data=[0.5] * 64)
        assert http.post("/v2/models/bsd-denoiser-unet/infer", json=header).status_code == 200
