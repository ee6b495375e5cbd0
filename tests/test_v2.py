"""Open Inference Protocol (KServe v2) driven by the real Triton HTTP client."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.images import decode_image
from service.manifest import Manifest
from service.tasks.classification import preprocess
from tests.conftest import CLASSIFIER, MODELS, LiveServer, cifar_photo, start_server, write_toy_classifier


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


def test_versioned_paths_take_the_served_version_only(client: triton.InferenceServerClient) -> None:
    """Clients given a model_version call /v2/models/{name}/versions/{v}/...: the served one answers, others 404."""
    tensor = photos_tensor(["ship"])
    request = triton.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor)
    version = Manifest.read(MODELS / CLASSIFIER).version
    assert client.is_model_ready(CLASSIFIER, model_version=version)
    assert client.get_model_metadata(CLASSIFIER, model_version=version)["versions"] == [version]
    assert client.get_model_config(CLASSIFIER, model_version=version) == client.get_model_config(CLASSIFIER)
    assert client.get_inference_statistics(CLASSIFIER, model_version=version)["model_stats"][0]["name"] == CLASSIFIER
    logits = client.infer(CLASSIFIER, [request], model_version=version).as_numpy("logits")
    assert Manifest.read(MODELS / CLASSIFIER).labels[int(logits.argmax())] == "ship"
    with pytest.raises(InferenceServerException, match="has version"):
        client.infer(CLASSIFIER, [request], model_version="999")
    assert not client.is_model_ready(CLASSIFIER, model_version="999")


def test_inference_statistics_count_requests_batches_and_time(client: triton.InferenceServerClient) -> None:
    """Triton's statistics extension, read by tritonclient: what ran since the model loaded, /v1 and /v2 alike."""
    before = client.get_inference_statistics(CLASSIFIER)["model_stats"][0]
    tensor = photos_tensor(["ship", "cat", "dog"])
    request = triton.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor)
    client.infer(CLASSIFIER, [request])
    after = client.get_inference_statistics(CLASSIFIER)["model_stats"][0]
    assert after["name"] == CLASSIFIER and after["version"] == Manifest.read(MODELS / CLASSIFIER).version
    assert after["inference_count"] - before["inference_count"] == 3  # samples
    assert after["execution_count"] - before["execution_count"] == 1  # one batch of three
    stats, earlier = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - earlier["success"]["count"] == 1  # one request
    assert stats["compute_infer"]["ns"] > earlier["compute_infer"]["ns"] and after["last_inference"] > 0
    assert stats["success"]["ns"] - earlier["success"]["ns"] >= stats["compute_infer"]["ns"] - earlier["compute_infer"]["ns"]
    assert any(entry["batch_size"] == 3 for entry in after["batch_stats"])
    every = client.get_inference_statistics()["model_stats"]
    assert CLASSIFIER in [entry["name"] for entry in every] and "statistics" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")


def test_repository_index_and_model_config_in_tritons_form(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    served = sorted(folder.name for folder in MODELS.iterdir() if (folder / "model.json").is_file())
    assert [entry["name"] for entry in index] == served
    assert all(entry["state"] == "READY" for entry in index)
    config = client.get_model_config(CLASSIFIER)
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}]
    assert config["output"][0]["name"] == "logits" and config["output"][0]["dims"] == [10]


def test_a_failed_model_is_unavailable_in_the_index(tmp_path: Path) -> None:
    shutil.copytree(MODELS / CLASSIFIER, tmp_path / CLASSIFIER)
    shutil.copytree(MODELS / CLASSIFIER, tmp_path / "broken")
    manifest = json.loads((tmp_path / "broken" / "model.json").read_text())
    (tmp_path / "broken" / "model.json").write_text(json.dumps({**manifest, "name": "broken"}))
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a graph")
    with start_server(models_dir=tmp_path) as live, live.client() as http:
        index = http.post("/v2/repository/index").json()
    assert [entry["name"] for entry in index] == ["broken", CLASSIFIER]
    assert index[0]["state"] == "UNAVAILABLE" and "sha256" in index[0]["reason"]
    assert index[1] == {"name": CLASSIFIER, "version": manifest["version"], "state": "READY"}


def test_documented_v2_paths_have_no_stray_version_parameter(server: LiveServer) -> None:
    with server.client() as http:
        schema = http.get("/openapi.json").json()
        assert http.head("/v2/health/ready").status_code == http.head("/v2/health/live").status_code == 200
    for path, operations in schema["paths"].items():
        if path.startswith("/v2"):
            for operation in operations.values():
                assert "version" not in [parameter["name"] for parameter in operation.get("parameters", [])], path
                assert "HTTPValidationError" not in json.dumps(operation["responses"]), path


def documented_bodies(schema: dict, path: str, method: str, status: int) -> list[dict]:
    """The component schemas an operation documents for a status (each of an anyOf)."""
    body = schema["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    return [schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]] for ref in body.get("anyOf", [body]) if "$ref" in ref]


def matches_documented(schema: dict, path: str, method: str, response: httpx.Response) -> bool:
    body = response.json()
    options = documented_bodies(schema, path, method, response.status_code)
    return any(set(option.get("required", [])) <= set(body) <= set(option.get("properties", {})) for option in options)


def test_v2_health_metadata_and_refusals_answer_what_their_schema_documents(server: LiveServer, tmp_path: Path) -> None:
    """A schemathesis review: /v2/health/ready's 503 {"ready": false} was documented as the router's V2Error (a required
    "error"), the health and metadata 200s as any object, and infer's 415 for an unknown Content-Encoding not at all."""
    with start_server(models_dir=tmp_path) as empty, empty.client() as http:
        schema = http.get("/openapi.json").json()
        not_ready = http.get("/v2/health/ready")
        assert not_ready.status_code == 503 and not_ready.json() == {"ready": False}
        assert matches_documented(schema, "/v2/health/ready", "get", not_ready)
    with server.client() as http:
        for path, documented in [
            ("/v2/health/live", "/v2/health/live"),
            ("/v2/health/ready", "/v2/health/ready"),
            ("/v2", "/v2"),
            (f"/v2/models/{CLASSIFIER}", "/v2/models/{name}"),
            (f"/v2/models/{CLASSIFIER}/ready", "/v2/models/{name}/ready"),
        ]:
            answer = http.get(path)
            assert answer.status_code == 200 and matches_documented(schema, documented, "get", answer), (path, answer.text)
        brotli = http.post(f"/v2/models/{CLASSIFIER}/infer", content=b"{}", headers={"Content-Encoding": "br"})
        assert brotli.status_code == 415 and matches_documented(schema, "/v2/models/{name}/infer", "post", brotli)


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
            predictions = http.post("/v1/classify", files={"file": cifar_photo(label).open("rb")}).json()["predictions"]
            assert manifest.labels[int(row.argmax())] == predictions[0]["label"]
            probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()  # what /v1 reports, from /v2's logits
            for prediction in predictions:
                assert probabilities[prediction["index"]] == pytest.approx(prediction["probability"], abs=1e-5)


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


def test_a_free_size_model_takes_a_bounded_run_and_an_unknown_output_costs_no_run(server: LiveServer) -> None:
    """ONNX Runtime keeps its largest run's memory: an 8 kB gzipped 2048x2048 request kept 2.2 GB for good."""
    side = 1028  # 1,056,784 pixels, over the 1,048,576 of a /v1/denoise run; the data is never read
    header = {"inputs": [{"name": "input", "shape": [1, 1, side, side], "datatype": "FP32", "data": [0.5]}]}
    with server.client() as http:
        response = http.post("/v2/models/bsd-denoiser-unet/infer", json=header)
        assert response.status_code == 400 and "exceed 1,048,576 per request" in response.json()["error"]
        header["inputs"][0].update(shape=[1, 1, 8, 8], data=[0.5] * 64)
        header["outputs"] = [{"name": "nope"}]
        runs = re.compile(r'^ocellus_inference_seconds_count\{model="bsd-denoiser-unet"\} (\S+)$', re.M)
        before = runs.search(http.get("/metrics").text)
        response = http.post("/v2/models/bsd-denoiser-unet/infer", json=header)
        assert response.status_code == 400 and "unknown output 'nope'" in response.json()["error"]
        after = runs.search(http.get("/metrics").text)
        assert before and after and before.group(1) == after.group(1)  # refused before the model ran


def infer_json(server: LiveServer, payload: object, **kwargs: object) -> tuple[int, dict, str]:
    response = httpx.post(f"{server.url}/v2/models/{CLASSIFIER}/infer", content=json.dumps(payload), timeout=30, **kwargs)
    return response.status_code, response.json(), response.headers.get("x-error-code", "")


def one_input(data: object, shape: object = (1, 3, 32, 32), **extra: object) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(shape) if isinstance(shape, tuple) else shape,
                "datatype": "FP32",
                "data": data,
                **extra,
            }
        ]
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (one_input([None] * 3072), "numbers"),
        (one_input(["1.5"] * 3072), "numbers"),
        (one_input([True] * 3072), "numbers"),
        (one_input([True, *ZEROS[1:]]), "not true or false"),  # numpy alone would read it as 1.0
        (one_input([[*ZEROS[:-1], False]]), "not true or false"),  # nested too
        (one_input([1e39, *ZEROS[1:]]), "input"),  # beyond FP32: not silently infinite
        (one_input(ZEROS, shape=["1", 3, 32, 32]), "shape"),
        (one_input(ZEROS, shape=(33, 3, 32, 32)), "max_batch_size"),  # refused before any array exists
        ({**one_input(ZEROS), "outputs": [{"name": "logits"}, {"name": "logits"}]}, "twice"),
        ({**one_input(ZEROS), "parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
        ({"inputs": one_input(ZEROS)["inputs"] * 2}, "exactly one input"),
    ],
)
def test_loose_or_oversized_tensors_are_400s(server: LiveServer, payload: dict, message: str) -> None:
    status, body, code = infer_json(server, payload)
    assert status == 400 and message in body["error"], body
    assert code  # the error's code travels in X-Error-Code, for metrics and logs (the /v2 body has none)


def test_nan_literals_are_refused_and_never_answered(server: LiveServer) -> None:
    text = json.dumps(one_input(ZEROS)).replace("0.0", "NaN", 1)
    response = httpx.post(f"{server.url}/v2/models/{CLASSIFIER}/infer", content=text, timeout=30)
    assert response.status_code == 400 and "NaN" in response.json()["error"]


def test_trailing_binary_bytes_are_refused(server: LiveServer) -> None:
    header = json.dumps(one_input(None, parameters={"binary_data_size": 3072 * 4})).encode()
    response = httpx.post(
        f"{server.url}/v2/models/{CLASSIFIER}/infer",
        content=header + np.zeros(3072 + 1, np.float32).tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert response.status_code == 400 and "follow the last tensor" in response.json()["error"]


def test_a_binary_data_size_without_its_bytes_is_told_so(server: LiveServer) -> None:
    """A schemathesis review: a JSON-only request setting binary_data_size 12288 was told it "does not fit shape
    [1, 3, 32, 32]", which it does."""
    header = json.dumps(one_input(None, parameters={"binary_data_size": 3072 * 4})).encode()
    url = f"{server.url}/v2/models/{CLASSIFIER}/infer"
    json_only = httpx.post(url, content=header, timeout=30)
    assert json_only.status_code == 400 and "no binary data follows the JSON header" in json_only.json()["error"]
    cut = header + np.zeros(100, np.float32).tobytes()
    short = httpx.post(url, content=cut, headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert short.status_code == 400 and "only 400 bytes follow the JSON header" in short.json()["error"]
    wrong = json.dumps(one_input(None, parameters={"binary_data_size": 12})).encode()
    assert "does not fit shape" in httpx.post(url, content=wrong, timeout=30).json()["error"]


def test_an_empty_infer_body_is_documented_as_required_and_told_so(server: LiveServer) -> None:
    """A schemathesis review: the request body was documented optional, and an empty one was told that an
    Inference-Header-Content-Length it never sent is out of range."""
    with server.client() as http:
        assert http.get("/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["required"]
        empty = http.post(f"/v2/models/{CLASSIFIER}/infer")
    assert empty.status_code == 400 and "the body is empty" in empty.json()["error"], empty.text


def test_the_header_length_is_a_plain_byte_count(server: LiveServer) -> None:
    header = json.dumps(one_input(None, parameters={"binary_data_size": 3072 * 4})).encode()
    body = header + np.zeros(3072, np.float32).tobytes()
    for sent, status in [(str(len(header)), 200), (f"+{len(header)}", 400), (f"{len(header) // 10}_{len(header) % 10}", 400)]:
        response = httpx.post(
            f"{server.url}/v2/models/{CLASSIFIER}/infer",
            content=body,
            headers={"Inference-Header-Content-Length": sent},
            timeout=30,
        )
        assert response.status_code == status, (sent, response.text)  # int() alone read "+119" and "11_9" as 119


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_work_like_plain_ones(client: triton.InferenceServerClient, algorithm: str) -> None:
    tensor = photos_tensor(["cat", "ship"])
    request = triton.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor, binary_data=True)
    plain = client.infer(CLASSIFIER, [request]).as_numpy("logits")
    packed = client.infer(CLASSIFIER, [request], request_compression_algorithm=algorithm).as_numpy("logits")
    assert np.array_equal(plain, packed)


def test_a_compression_bomb_is_stopped_at_the_body_limit(server: LiveServer) -> None:
    bomb = gzip.compress(b" " * (40 << 20))  # 40 MiB of spaces in ~40 kB
    response = httpx.post(
        f"{server.url}/v2/models/{CLASSIFIER}/infer", content=bomb, headers={"Content-Encoding": "gzip"}, timeout=30
    )
    assert response.status_code == 413 and response.headers["x-error-code"] == "payload_too_large"


def test_a_shape_of_a_million_axes_is_refused_before_anything_multiplies_it(server: LiveServer) -> None:
    """Multiplying out the shape costs time quadratic in its length, holding the GIL: this 2 MB body (a few kB
    gzipped) stalled the server ~20 s. Refused at parsing."""
    payload = one_input([0.0], shape=[3] * 1_000_000)
    response = httpx.post(
        f"{server.url}/v2/models/{CLASSIFIER}/infer",
        content=gzip.compress(json.dumps(payload).encode()),
        headers={"Content-Encoding": "gzip"},
        timeout=60,
    )
    assert response.status_code == 400 and "JSON values" in response.json()["error"], response.text[:300]
    assert len(response.text) < 1000  # no echo of a million axes
    nine = httpx.post(f"{server.url}/v2/models/{CLASSIFIER}/infer", json=one_input([0.0], shape=[1] * 9), timeout=30)
    assert nine.status_code == 400 and "shape" in nine.json()["error"] and "at most 8" in nine.json()["error"], nine.text


@pytest.mark.parametrize(
    ("model", "filler", "counted"),
    [
        (CLASSIFIER, b"[],", "8,000,003 JSON lists"),
        (CLASSIFIER, b"1.5,", "6,000,006 JSON values"),
        ("color-denoiser-unet", b"{},", "7,000,002 JSON objects"),  # within a free-size graph's millions of values
    ],
)
def test_small_gzipped_bodies_of_millions_of_json_values_are_refused_before_parsing(
    server: LiveServer, model: str, filler: bytes, counted: str
) -> None:
    """25 MB of "[]," (23 kB gzipped) parsed into 8.7 million lists: ~1 GB and seconds of GIL-holding CPU per request,
    from an infer key (a security hunt); "1.5," into ~230 MB. The byte limit bounded neither."""
    count = {b"[],": 8_000_000, b"1.5,": 6_000_000, b"{},": 7_000_000}[filler]
    body = b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [' + filler * count + b"1]}]}"
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        content=gzip.compress(body),
        headers={"Content-Encoding": "gzip"},
        timeout=60,
    )
    assert response.status_code == 400 and counted in response.json()["error"], response.text[:300]
    # The largest input nested one list per axis, and flat, still passes.
    batch = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    for data in (batch.tolist(), batch.ravel().tolist()):
        payload = {"inputs": [{"name": "input", "shape": [32, 3, 32, 32], "datatype": "FP32", "data": data}]}
        assert httpx.post(f"{server.url}/v2/models/{CLASSIFIER}/infer", json=payload, timeout=60).status_code == 200


def test_bare_v2_errors_use_the_protocol_shape(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/v2", timeout=30)
    assert response.status_code == 405 and isinstance(response.json()["error"], str)


def test_the_classification_extension_is_refused_not_ignored(client: triton.InferenceServerClient) -> None:
    tensor = photos_tensor(["cat"])
    request = triton.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor)
    with pytest.raises(InferenceServerException, match="class_count"):  # tritonclient sends it as "classification"
        client.infer(CLASSIFIER, [request], outputs=[triton.InferRequestedOutput("logits", class_count=3)])


def test_a_cut_or_padded_gzip_body_is_refused(server: LiveServer) -> None:
    packed = gzip.compress(json.dumps(one_input(ZEROS)).encode())
    for body in (packed[:-6], packed + b"junk"):
        response = httpx.post(
            f"{server.url}/v2/models/{CLASSIFIER}/infer", content=body, headers={"Content-Encoding": "gzip"}, timeout=30
        )
        assert response.status_code == 400, response.text


def test_integer_outputs_have_their_protocol_datatype(tmp_path: Path) -> None:
    """A graph whose output is UINT16: the metadata named it "tensor(uint16)" and infer was a 500 (code review)."""
    from onnx import TensorProto

    write_toy_classifier(tmp_path, "counts", "Cast", TensorProto.UINT16, to=TensorProto.UINT16)
    with start_server(models_dir=tmp_path) as live:
        client = triton.InferenceServerClient(url=live.url.removeprefix("http://"))
        (output,) = client.get_model_metadata("counts")["outputs"]
        assert output["datatype"] == "UINT16"
        tensor = triton.InferInput("input", [2, 3, 4, 4], "FP32")
        tensor.set_data_from_numpy(np.arange(96, dtype=np.float32).reshape(2, 3, 4, 4))
        result = client.infer("counts", [tensor]).as_numpy("logits")
    assert result.dtype == np.uint16 and result.tolist() == [[7, 23, 39], [55, 71, 87]]
