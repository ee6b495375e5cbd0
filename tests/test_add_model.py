"""``python -m service.add_model``: ONNX graphs made elsewhere, described by the tool, served like the recipes' own.

The "foreign" graphs are the reference models' ONNX files without their manifests, one of them
re-exported with its batch fixed to 1, as many exporters leave it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from service.manifest import Manifest
from service.runtime import OnnxModel
from tests.conftest import CLASSIFIER, MODELS, ROOT, cifar_photo, png_bytes, start_server

CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def add_model(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.add_model", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def fixed_batch_graph(source: Path, target: Path, batch: int = 1) -> Path:
    """The graph with its batch dimension fixed."""
    model = onnx.load(str(source))
    for tensor in [*model.graph.input, *model.graph.output]:
        dim = tensor.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    del model.graph.value_info[:]
    onnx.save(model, str(target))
    return target


def test_a_fixed_batch_graph_runs_any_batch_in_slices(tmp_path: Path) -> None:
    free = OnnxModel(MODELS / CLASSIFIER / "model.onnx", "input", ["logits"], threads=1)
    fixed = OnnxModel(fixed_batch_graph(MODELS / CLASSIFIER / "model.onnx", tmp_path / "b4.onnx", 4), "input", ["logits"], 1)
    batch = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)  # one full slice, one padded
    assert fixed.fixed_batch == 4 and free.fixed_batch is None
    np.testing.assert_allclose(fixed.run(batch)[0], free.run(batch)[0], atol=1e-5)
    assert fixed.run(batch[:1])[0].shape == (1, 10)


@pytest.fixture(scope="module")
def reference() -> Manifest:
    return Manifest.read(MODELS / CLASSIFIER)


def test_a_fixed_batch_classifier_is_described_checked_and_served_under_concurrency(tmp_path: Path, reference: Manifest) -> None:
    graph = fixed_batch_graph(MODELS / CLASSIFIER / "model.onnx", tmp_path / "exported.onnx")
    models = tmp_path / "models"
    mean, std = (map(str, values) for values in (reference.input.mean, reference.input.std))
    done = add_model(graph, "--name", "foreign", "--task", "classification", "--labels", CLASSES, "--mean", *mean, "--std", *std,
                     "--default", "top_k=1", "--serving", "max_batch_size=4", "--serving", "sessions=2",
                     "--models-dir", models)  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = Manifest.read(models / "foreign")
    assert manifest.input.size == (32, 32) and not manifest.input.dynamic_batch and manifest.defaults == {"top_k": 1}
    assert manifest.serving is not None and (manifest.serving.max_batch_size, manifest.serving.sessions) == (4, 2)
    assert manifest.training["imported_from"] == str(graph)

    photos = [(label, cifar_photo(label, i).read_bytes()) for label in CLASSES.split(",") for i in range(3)]
    with start_server(models_dir=models) as live, live.client() as http:

        def classify(photo: bytes) -> str:
            answer = http.post("/v1/classify", params={"model": "foreign"}, content=photo, headers={"Content-Type": "image/jpeg"})
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]["label"]

        with ThreadPoolExecutor(12) as pool:  # concurrent requests: the batcher merges them, the graph runs them one by one
            foreign = list(pool.map(classify, [photo for _, photo in photos]))
        # The Open Inference Protocol takes any batch too, and says so.
        assert http.get("/v2/models/foreign").json()["inputs"][0]["shape"] == [-1, 3, 32, 32]
        tensor = {"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": [0.0] * (2 * 3 * 32 * 32)}
        infer = http.post("/v2/models/foreign/infer", json={"inputs": [tensor]})
        assert infer.status_code == 200 and infer.json()["outputs"][0]["shape"] == [2, 10], infer.text
        # The manifest's serving keys apply to this model alone; the others keep the server's settings.
        serving = http.get("/v1/models/foreign").json()["serving"]
        assert {key: serving[key] for key in ("max_batch_size", "sessions", "max_queue")} == {
            "max_batch_size": 4,
            "sessions": 2,
            "max_queue": 512,
        }
        assert http.get("/v2/models/foreign/config").json()["max_batch_size"] == 4
        five = {**tensor, "shape": [5, 3, 32, 32], "data": [0.0] * (5 * 3 * 32 * 32)}
        over = http.post("/v2/models/foreign/infer", json={"inputs": [five]})
        assert over.status_code == 400 and "exceeds max_batch_size 4" in over.json()["error"], over.text
    with start_server() as live, live.client() as http:
        own = [
            http.post("/v1/classify", params={"model": CLASSIFIER, "top_k": 1}, files={"file": photo}).json()["predictions"][0][
                "label"
            ]
            for _, photo in photos
        ]
    assert foreign == own
    assert sum(label == truth for label, (truth, _) in zip(foreign, photos, strict=True)) >= 0.8 * len(photos)


def test_a_denoiser_gets_its_stride_and_runs_at_any_size_like_the_reference(tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = add_model(MODELS / "bsd-denoiser-unet" / "model.onnx", "--name", "plain-denoiser", "--task", "denoising",
                     "--models-dir", models)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Manifest.read(models / "plain-denoiser").defaults == {"stride": 4}  # found by trying sizes: 3 scales
    shutil.copytree(MODELS / "bsd-denoiser-unet", models / "bsd-denoiser-unet")
    clean = Image.open(sorted((ROOT.parent / "shared" / "datasets" / "denoising" / "Set12").glob("*.png"))[0])
    photo = png_bytes(clean.crop((0, 0, 255, 253)))  # odd sides: padded to the stride, cut back
    with start_server(models_dir=models) as live, live.client() as http:
        answers = [
            http.post("/v1/denoise", params={"model": name}, content=photo, headers={"Content-Type": "image/png"})
            for name in ("plain-denoiser", "bsd-denoiser-unet")
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content == answers[1].content
    assert Image.open(io.BytesIO(answers[0].content)).size == (255, 253)


def softmax_graph(source: Path, target: Path) -> Path:
    """The classifier with a Softmax after its logits, as many exports end."""
    model = onnx.load(str(source))
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    model.graph.output[0].name = "probabilities"
    onnx.save(model, str(target))
    return target


def test_probabilities_are_refused_and_missing_labels_are_numbered(tmp_path: Path) -> None:
    graph = softmax_graph(MODELS / CLASSIFIER / "model.onnx", tmp_path / "softmax.onnx")
    done = add_model(graph, "--name", "probs", "--task", "classification", "--models-dir", tmp_path / "models")
    assert done.returncode != 0 and "already sum to 1" in done.stderr, done.stderr
    plain = add_model(MODELS / CLASSIFIER / "model.onnx", "--name", "numbered", "--task", "classification",
                      "--models-dir", tmp_path / "models")  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert Manifest.read(tmp_path / "models" / "numbered").labels == [str(i) for i in range(10)]


def test_folders_are_never_left_in_a_state_that_serves_nothing(tmp_path: Path) -> None:
    graph = MODELS / CLASSIFIER / "model.onnx"
    shutil.copytree(MODELS / CLASSIFIER, tmp_path / "cifar-v1")  # declares the name cifar10-resnet
    taken = add_model(graph, "--name", CLASSIFIER, "--task", "classification", "--models-dir", tmp_path)
    assert taken.returncode != 0 and "already serve the name" in taken.stderr, taken.stderr
    (tmp_path / ".m.previous").mkdir()  # left by a swap that was cut short: a reload would take "m" as mid-swap
    done = add_model(graph, "--name", "m", "--task", "classification", "--models-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-v1", "m"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "classification", "--labels", "a,b,c"], "10 classes but 3 labels"),
        (["--task", "classification", "--labels", "classes.txt"], "no such file"),
        (["--task", "classification", "--size", "64", "64"], "the graph takes [32, 32]"),
        (["--task", "denoising", "--size", "32", "32"], "dynamic height and width"),
        (["--task", "classification", "--mean", "0.5"], "--mean and --std take 3 value(s)"),
        (["--task", "classification", "--color", "GRAY"], "has 3 channels"),
        (["--task", "segmentation"], "dynamic height and width"),
        (["--task", "detection"], "detection needs --output boxes=TENSOR, scores=TENSOR"),
        (["--task", "classification", "--input", "pixels"], "no input 'pixels'"),
        (["--task", "classification", "--name", "../escape"], "--name '../escape'"),
        (["--task", "classification", "--default", "top_k=three"], "defaults.top_k: Input should be a valid integer"),
        (["--task", "classification", "--serving", "max_batch=4"], "max_batch: Extra inputs are not permitted"),
        (["--task", "classification", "--serving", "sessions=0"], "serving.sessions: Input should be greater than or equal to 1"),
        (["--task", "classification", "--serving", "max_batch_size=true"], "serving.max_batch_size: Input should be a valid int"),
    ],
)
def test_what_would_not_serve_is_refused_with_a_reason(tmp_path: Path, arguments: list[str], message: str) -> None:
    named = arguments if "--name" in arguments else [*arguments, "--name", "foreign"]
    done = add_model(MODELS / CLASSIFIER / "model.onnx", *named, "--models-dir", tmp_path)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_graph_of_free_size_needs_a_size_unless_it_segments(tmp_path: Path) -> None:
    graph = MODELS / "pennfudan-unet" / "model.onnx"  # fully convolutional
    done = add_model(graph, "--name", "free", "--task", "classification", "--models-dir", tmp_path)
    assert done.returncode != 0 and "give --size HEIGHT WIDTH" in done.stderr, done.stderr
    segmenter = add_model(
        graph, "--name", "seg", "--task", "segmentation", "--labels", "background,person", "--models-dir", tmp_path
    )
    assert segmenter.returncode == 0, segmenter.stderr
    assert Manifest.read(tmp_path / "seg").defaults == {"stride": 32, "max_side": 1024}


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path: Path) -> None:
    graph = MODELS / CLASSIFIER / "model.onnx"
    assert add_model(graph, "--name", "m", "--task", "classification", "--models-dir", tmp_path).returncode == 0
    again = add_model(graph, "--name", "m", "--task", "classification", "--version", "2", "--models-dir", tmp_path)
    assert again.returncode != 0 and "--replace" in again.stderr
    replaced = add_model(
        graph, "--name", "m", "--task", "classification", "--version", "2", "--replace", "--models-dir", tmp_path
    )
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((tmp_path / "m" / "model.json").read_text())["version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no building or previous folder left


def gray_input_graph(source: Path, target: Path, mean: list[float], std: list[float]) -> Path:
    """The RGB graph behind a GRAY input normalised by the channel averages (re-normalised per channel inside)."""
    model = onnx.load(str(source))
    rgb = model.graph.input[0]
    gray_mean, gray_std = float(np.mean(mean)), float(np.mean(std))
    scale = np.asarray([gray_std / s for s in std], np.float32).reshape(1, 3, 1, 1)
    shift = np.asarray([(gray_mean - m) / s for m, s in zip(mean, std, strict=True)], np.float32).reshape(1, 3, 1, 1)
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(scale, "gray_scale"), onnx.numpy_helper.from_array(shift, "gray_shift")]
    )
    model.graph.node.insert(0, onnx.helper.make_node("Add", ["gray_scaled", "gray_shift"], [rgb.name]))
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["gray_repeated", "gray_scale"], ["gray_scaled"]))
    model.graph.node.insert(0, onnx.helper.make_node("Concat", ["gray", "gray", "gray"], ["gray_repeated"], axis=1))
    dims = [d.dim_param or d.dim_value for d in rgb.type.tensor_type.shape.dim]
    model.graph.input.remove(rgb)
    model.graph.input.insert(0, onnx.helper.make_tensor_value_info("gray", onnx.TensorProto.FLOAT, [dims[0], 1, *dims[2:]]))
    onnx.save(model, str(target))
    return target


def test_a_gray_face_detector_finds_faces_for_the_colour_embedder(tmp_path: Path) -> None:
    detector = Manifest.read(MODELS / "face-detector")
    graph = gray_input_graph(
        MODELS / "face-detector" / "model.onnx", tmp_path / "gray.onnx", detector.input.mean, detector.input.std
    )
    models = tmp_path / "models"
    mean, std = str(np.mean(detector.input.mean)), str(np.mean(detector.input.std))
    done = add_model(graph, "--name", "gray-faces", "--task", "detection", "--labels", "face", "--mean", mean, "--std", std,
                     "--models-dir", models)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Manifest.read(models / "gray-faces").input.color == "GRAY"
    embedder = Manifest.read(MODELS / "lfw-face")
    (models / "lfw-face").mkdir()
    shutil.copyfile(MODELS / "lfw-face" / "model.onnx", models / "lfw-face" / "model.onnx")
    embedder.model_copy(update={"defaults": {**embedder.defaults, "detector": "gray-faces"}}).write(models / "lfw-face")
    photo = (ROOT.parent / "shared" / "datasets" / "lfw" / "images" / "Colin_Powell").glob("*.jpg")
    with start_server(models_dir=models) as live, live.client() as http:
        answer = http.post("/v1/faces/embed", files={"file": sorted(photo)[0].read_bytes()})
    assert answer.status_code == 200, answer.text  # the photo is decoded in colour for the crops, gray for the detector
    assert len(answer.json()["faces"]) == 1


def free_size_graph(path: Path, node: onnx.NodeProto, out_channels: int, initializers: list[onnx.TensorProto]) -> Path:
    """A one-node graph from [N, 3, H, W] to [N, out_channels, H, W]."""
    graph = onnx.helper.make_graph(
        [node],
        "tiny",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", out_channels, "H", "W"])],
        initializers,
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return path


def test_graphs_the_service_would_refuse_or_misread_are_refused_here(tmp_path: Path) -> None:
    # A colour denoiser whose output is gray: its one channel was spread over R, G and B without a word.
    gray = free_size_graph(tmp_path / "gray.onnx", onnx.helper.make_node("ReduceMean", ["input"], ["output"], axes=[1]), 1, [])
    done = add_model(gray, "--name", "gray", "--task", "denoising", "--models-dir", tmp_path / "models")
    assert done.returncode != 0 and "image must be [N, 3, H, W] like the input" in done.stderr, done.stderr
    # A segmenter of 300 classes: written, then refused by the service at load (label maps are 8-bit).
    weights = onnx.numpy_helper.from_array(np.ones((300, 3, 1, 1), np.float32), "weights")
    conv = onnx.helper.make_node("Conv", ["input", "weights"], ["output"])
    wide = free_size_graph(tmp_path / "wide.onnx", conv, 300, [weights])
    done = add_model(wide, "--name", "wide", "--task", "segmentation", "--models-dir", tmp_path / "models")
    assert done.returncode != 0 and "300 classes: segmentation label maps are 8-bit" in done.stderr, done.stderr
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"\xff\xd8 a photo, not a graph"])
def test_a_file_onnx_runtime_cannot_load_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    """ONNX Runtime's errors are not ValueErrors: an empty file or a photo printed a traceback (black-box hunt)."""
    (tmp_path / "not.onnx").write_bytes(content)
    done = add_model(tmp_path / "not.onnx", "--name", "x", "--task", "classification", "--models-dir", tmp_path / "models")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("add_model: not.onnx does not load in ONNX Runtime"), done.stderr


def test_a_graph_with_its_weights_in_a_separate_file_is_refused(tmp_path: Path) -> None:
    """The folder got model.onnx alone: the service (which loads the bytes) failed it, or, started where a file of
    that name lay, loaded weights outside the sha256 it checks."""
    model = onnx.load(str(MODELS / CLASSIFIER / "model.onnx"))
    graph = tmp_path / "split.onnx"
    onnx.save_model(model, str(graph), save_as_external_data=True, location="split.onnx.data", size_threshold=0)
    done = subprocess.run(  # run beside the weights file, as a user would
        [sys.executable, "-m", "service.add_model", "split.onnx", "--name", "split", "--task", "classification",
         "--models-dir", "models"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode != 0 and "keeps its weights in a separate file" in done.stderr, done.stderr
    assert not (tmp_path / "models").exists()


def test_a_hidden_folder_left_by_a_swap_does_not_hold_the_name(tmp_path: Path) -> None:
    graph = MODELS / CLASSIFIER / "model.onnx"
    assert add_model(graph, "--name", "m", "--task", "classification", "--models-dir", tmp_path).returncode == 0
    (tmp_path / "m").rename(tmp_path / ".m.previous")  # as an interrupted swap leaves it: the service skips it
    again = add_model(graph, "--name", "m", "--task", "classification", "--models-dir", tmp_path)
    assert again.returncode == 0, again.stderr
