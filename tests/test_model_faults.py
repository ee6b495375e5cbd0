"""A model that answers NaN or infinity: never a 500 from a JSON encoder, never a NaN passed on as an answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.tasks import detection
from tests.conftest import LiveServer, start_server, write_toy_classifier


@pytest.fixture(scope="module")
def log_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A classifier whose logits are the log of each channel's mean: -inf for a black photo, finite for a grey one."""
    from onnx import TensorProto

    models: Path = tmp_path_factory.mktemp("models")
    write_toy_classifier(models, "log", "Log", TensorProto.FLOAT)
    with start_server(models_dir=models) as live:
        yield live


def png(grey: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (grey, grey, grey)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_non_finite_answer_is_a_model_fault_in_json_not_an_encoder_crash(log_server: LiveServer) -> None:
    with log_server.client() as client:
        served = client.post("/v1/classify", params={"model": "log"}, content=png(128))
        refused = client.post("/v1/classify", params={"model": "log"}, content=png(0))
        after = client.post("/v1/classify", params={"model": "log"}, content=png(128))
    assert served.status_code == after.status_code == 200, served.text
    assert refused.status_code == 500, refused.text
    error = refused.json()["error"]
    assert error["code"] == "inference_failed" and "NaN or infinite" in error["message"] and "'log'" in error["message"]


def test_v2_sends_non_finite_outputs_as_binary_but_not_as_json(log_server: LiveServer) -> None:
    client = triton.InferenceServerClient(url=log_server.url.removeprefix("http://"))
    tensor = triton.InferInput("input", [2, 3, 4, 4], "FP32")
    tensor.set_data_from_numpy(np.stack([np.zeros((3, 4, 4)), -np.ones((3, 4, 4))]).astype(np.float32))
    binary = client.infer("log", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=True)])
    logits = binary.as_numpy("logits")
    assert np.isneginf(logits[0]).all() and np.isnan(logits[1]).all()
    with pytest.raises(InferenceServerException) as refused:  # JSON has no NaN nor infinity
        client.infer("log", [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
    assert refused.value.status() == "422" and "binary" in refused.value.message()


def test_detection_drops_candidates_with_non_finite_boxes_or_scores() -> None:
    nan, inf = np.nan, np.inf
    boxes = np.array([[0, 0, 10, 10], [20, 20, inf, 30], [40, 40, 50, 50], [nan, 0, 5, 5], [60, 60, 70, 70]], np.float32)
    scores = np.array([[0.9, 0], [0.95, 0], [inf, 0], [0.8, 0], [nan, 0.7]], np.float32)
    for agnostic in (False, True):
        kept, score, label = detection.select(boxes, scores, 0.5, 0.5, 10, agnostic=agnostic)
        assert kept.tolist() == [[0, 0, 10, 10]] + ([] if agnostic else [[60, 60, 70, 70]]), agnostic
        assert np.isfinite(score).all() and label.tolist() == [0] + ([] if agnostic else [1])
