"""/v1/detect end to end over real HTTP against the reference face-mask detector, plus its numpy post-processing.

Real facemask test photos (the held-out 20 % of ``training/splits/facemask.json``), the real
ONNX graph, and a PyTorch/torchvision reference for thresholding + NMS + box mapping.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from service.images import Span, decode_for_graph, decode_image
from service.manifest import Manifest
from service.tasks import detection
from tests.conftest import DATASETS, MODELS, ROOT, damaged_png, oriented_jpeg, png_bytes, start_server
from training.datasets.voc import BoxedImage, load_boxes
from training.detector import reference_select, reference_to_original

DETECTOR = "facemask-detector"
FACEMASK = DATASETS / "facemask"
MANIFEST = Manifest.read(MODELS / DETECTOR)
LABELS = MANIFEST.labels
SPLIT = json.loads((ROOT / "training" / "splits" / "facemask.json").read_text())
SAMPLES = {s.key: s for s in load_boxes(FACEMASK)}
TEST = [SAMPLES[key] for key in SPLIT["test"]]


def post(client: httpx.Client, data: bytes, content_type: str = "image/jpeg", **params: object) -> httpx.Response:
    return client.post("/v1/detect", params={"model": DETECTOR, **params}, content=data, headers={"content-type": content_type})


def detections_of(response: httpx.Response) -> tuple[np.ndarray, np.ndarray, list[str]]:
    assert response.status_code == 200, response.text
    found = response.json()["detections"]
    boxes = np.array([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found], np.float32).reshape(-1, 4)
    return boxes, np.array([d["score"] for d in found], np.float32), [d["label"] for d in found]


def target(sample: BoxedImage) -> dict[str, torch.Tensor]:
    return {"boxes": torch.from_numpy(sample.boxes), "labels": torch.tensor([LABELS.index(n) for n in sample.names])}


def matched_fraction(a: np.ndarray, b: np.ndarray, iou: float) -> float:
    """Fraction of boxes in ``a`` that overlap some box of ``b`` by at least ``iou``."""
    if not len(a):
        return 1.0
    if not len(b):
        return 0.0
    return float((box_iou(torch.from_numpy(a), torch.from_numpy(b)).max(1).values >= iou).float().mean())


# --- quality on the held-out photos ----------------------------------------------------------


def test_faces_are_found_where_the_annotations_say(client: httpx.Client) -> None:
    """All 171 test photos over HTTP at a low threshold: the AP the manifest reports, from the service."""
    aware = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    agnostic = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    for metric in (aware, agnostic):
        metric.warn_on_many_detections = False  # COCO's rule: the best 100 per image count
    recalled = total = 0
    for sample in TEST:
        response = post(client, sample.path.read_bytes(), score_threshold=0.001, max_detections=300)
        boxes, scores, labels = detections_of(response)
        body = response.json()
        assert (body["width"], body["height"]) == Image.open(sample.path).size
        prediction = {
            "boxes": torch.from_numpy(boxes),
            "scores": torch.from_numpy(scores),
            "labels": torch.tensor([LABELS.index(n) for n in labels], dtype=torch.long),
        }
        aware.update([prediction], [target(sample)])
        # "Any face": the same detections, labels ignored (duplicates across classes count against it).
        agnostic.update(
            [{**prediction, "labels": torch.zeros_like(prediction["labels"])}],
            [{"boxes": torch.from_numpy(sample.boxes), "labels": torch.zeros(len(sample.boxes), dtype=torch.long)}],
        )
        # At the served default threshold, faces of at least 20 px are found.
        kept = boxes[scores >= MANIFEST.defaults["score_threshold"]]
        big = sample.boxes[(sample.boxes[:, 2:] - sample.boxes[:, :2]).min(1) >= 20]
        recalled += round(matched_fraction(big, kept, 0.5) * len(big))
        total += len(big)
    map50 = float(aware.compute()["map_50"])
    any50 = float(agnostic.compute()["map_50"])
    # The service's pipeline is the one the export evaluated: the same mAP, up to float noise.
    assert abs(map50 - MANIFEST.metrics["map50"]) < 0.01, (map50, MANIFEST.metrics["map50"])
    assert any50 >= MANIFEST.metrics["any_ap50"] - 0.05, (any50, MANIFEST.metrics["any_ap50"])
    assert any50 >= 0.80 and MANIFEST.metrics["images"] == len(TEST) == 171  # the bar, measured over HTTP
    assert recalled / total >= 0.8, f"{recalled}/{total} faces of >= 20 px found at the default threshold"


def test_served_detections_equal_the_pytorch_reference(client: httpx.Client) -> None:
    """Same input tensor, raw graph outputs -> torchvision batched_nms reference vs the service's answer."""
    session = ort.InferenceSession(str(MODELS / DETECTOR / MANIFEST.file), providers=["CPUExecutionProvider"])
    defaults = MANIFEST.defaults
    compared = 0
    for sample in TEST[:30]:
        data = sample.path.read_bytes()
        served_boxes, served_scores, served_labels = detections_of(post(client, data))
        inputs, letterbox = detection.preprocess(decode_image(data, 10**9), MANIFEST)
        boxes, scores = session.run(["boxes", "scores"], {"input": inputs})
        kept, score, label = reference_select(
            torch.from_numpy(boxes[0]),
            torch.from_numpy(scores[0]),
            defaults["score_threshold"],
            defaults["iou_threshold"],
            defaults["max_detections"],
            content=letterbox,
        )
        reference_boxes = reference_to_original(kept, letterbox).numpy()
        assert len(served_boxes) == len(reference_boxes), sample.key
        assert served_labels == [LABELS[i] for i in label.tolist()], sample.key
        assert np.abs(served_boxes - reference_boxes).max(initial=0) <= 1.0, sample.key
        assert np.abs(served_scores - score.numpy()).max(initial=0) <= 1e-3, sample.key
        compared += len(served_boxes)
    assert compared >= 100  # the comparison covered real detections, not empty lists
    metrics = MANIFEST.metrics
    assert metrics["parity_max_box_px"] <= 1.0 and metrics["parity_max_score_diff"] <= 1e-3
    assert metrics["parity_max_abs_graph_diff"] <= 2e-3 and metrics["latency_640px_ms"] < 40


# --- box mapping -----------------------------------------------------------------------------


def strong(response: httpx.Response, threshold: float = 0.5) -> np.ndarray:
    boxes, scores, _ = detections_of(response)
    return boxes[scores >= threshold]


def crowded_photo() -> BoxedImage:
    """A test photo with several faces of clear size, for geometric checks."""
    return max(TEST, key=lambda s: int(((s.boxes[:, 2:] - s.boxes[:, :2]).min(1) >= 25).sum()))


def test_exif_rotated_photo_gets_boxes_in_upright_pixels(client: httpx.Client) -> None:
    upright = Image.open(crowded_photo().path).convert("RGB")
    # Stored rotated 90 degrees clockwise, with EXIF orientation 8 telling viewers to undo that.
    stored = upright.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = io.BytesIO()
    stored.save(rotated, format="JPEG", quality=97, exif=exif.tobytes())
    a = post(client, rotated.getvalue())
    b = post(client, png_bytes(upright), "image/png")
    assert (a.json()["width"], a.json()["height"]) == upright.size
    boxes_a, boxes_b = strong(a), strong(b)
    assert len(boxes_b) >= 3
    assert matched_fraction(boxes_b, boxes_a, 0.8) >= 0.9 and matched_fraction(boxes_a, boxes_b, 0.8) >= 0.9


def test_large_odd_sized_photo_maps_boxes_to_its_own_pixels(client: httpx.Client) -> None:
    """A 2.5x up-scaled, odd-sized JPEG is draft-decoded smaller; boxes must still be in its pixels."""
    sample = crowded_photo()
    original = Image.open(sample.path).convert("RGB")
    big = original.resize((original.width * 5 // 2 | 1, original.height * 5 // 2 | 1), Image.Resampling.BICUBIC)
    assert big.width % 2 and big.height % 2
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    response = post(client, buffer.getvalue())
    assert (response.json()["width"], response.json()["height"]) == big.size
    boxes_big = strong(response)
    factor = np.array([big.width / original.width, big.height / original.height] * 2, np.float32)
    expected = strong(post(client, sample.path.read_bytes())) * factor
    assert len(expected) >= 3
    assert matched_fraction(expected, boxes_big, 0.7) >= 0.8
    # ... and the boxes sit on the annotated faces, scaled the same way.
    faces = sample.boxes * factor
    assert matched_fraction(boxes_big, faces, 0.5) >= 0.8


def test_boxes_stay_inside_narrow_and_tiny_images(client: httpx.Client) -> None:
    photo = Image.open(crowded_photo().path).convert("RGB")
    for size in ((77, 301), (301, 77), (33, 21), (1, 300), (1, 1)):
        response = post(client, png_bytes(photo.resize(size)), "image/png", score_threshold=0.001)
        body = response.json()
        assert response.status_code == 200 and (body["width"], body["height"]) == size
        for d in body["detections"]:
            box = d["box"]  # boxes that fell into the letterbox padding (no area left) are dropped
            assert 0 <= box["x1"] < box["x2"] <= size[0] and 0 <= box["y1"] < box["y2"] <= size[1]


def test_letterbox_round_trip() -> None:
    """A box placed through the letterbox comes back to the same original pixels (centred padding)."""
    for width, height in ((640, 427), (300, 601), (417, 417), (5, 3)):
        canvas, box = detection.letterbox_image(Image.new("RGB", (width, height), (200, 10, 10)), (416, 416), (0, 0, 0))
        assert canvas.size == (416, 416)
        pixels = np.asarray(canvas)
        ys, xs = np.nonzero(pixels[:, :, 0] > 100)
        assert xs.min() == box.pad_x and ys.min() == box.pad_y  # the photo sits where the letterbox says
        original = np.array([[0, 0, width, height], [width * 0.25, height * 0.5, width * 0.5, height * 0.75]], np.float32)
        placed = original * np.array([box.scale_x, box.scale_y] * 2) + np.array([box.pad_x, box.pad_y] * 2)
        np.testing.assert_allclose(detection.to_original(placed.astype(np.float32), box), original, atol=1e-3)
        # Draft decoding: the letterboxed image was 1/4 of the photo's size.
        np.testing.assert_allclose(
            detection.to_original(placed.astype(np.float32), box, Span.whole((width * 4, height * 4))), original * 4, atol=1e-2
        )


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_boxes_of_a_drafted_jpeg_land_on_the_photo(orientation: int) -> None:
    """A 4001x3001 JPEG is decoded at 1/4 scale as 1001x751 pixels, each covering 4 photo pixels, the last column and
    row partly past the stored image's edge, which EXIF orientations 3, 6, 8 turn to the left or top: scaled by
    4001 / 1001 = 3.997, boxes fell up to 3 px short; scaled by 4 but not shifted, a rotated photo's fell 3 px over."""
    data, truth = oriented_jpeg((4001, 3001), (1000, 808, 2000, 1608), orientation)
    decoded = decode_for_graph(data, 50_000_000, MANIFEST.input.color, MANIFEST.input.size, keep_photo=False)
    assert decoded.image.size == (1001, 751) and decoded.size == (4001, 3001)
    ys, xs = np.nonzero(np.asarray(decoded.image.convert("L")) > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [0, 0, 1001, 751]], np.float32)  # decoded pixels
    _, box = detection.preprocess(decoded.image, MANIFEST)
    placed = found * np.array([box.scale_x, box.scale_y] * 2, np.float32) + np.array([box.pad_x, box.pad_y] * 2, np.float32)
    expected = [truth, [0, 0, 4001, 3001]]  # the whole decoded image: the photo, clipped to it
    np.testing.assert_allclose(detection.to_original(placed, box, decoded.span), expected, atol=1.0)
    np.testing.assert_allclose(reference_to_original(torch.from_numpy(placed), box, decoded.span).numpy(), expected, atol=1.0)


# --- NMS -------------------------------------------------------------------------------------


def test_numpy_nms_equals_torchvision_on_random_boxes() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        count, classes = int(rng.integers(1, 400)), int(rng.integers(1, 4))
        corners = rng.uniform(0, 400, (count, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(2, 80, (count, 2)).astype(np.float32)], 1)
        scores = rng.uniform(0, 1, (count, classes)).astype(np.float32) ** 3
        for agnostic in (False, True):
            for score_threshold, iou_threshold, limit in ((0.05, 0.5, 300), (0.3, 0.3, 10), (0.0, 0.7, 1000)):
                ours = detection.select(boxes, scores, score_threshold, iou_threshold, limit, agnostic=agnostic)
                ref = reference_select(
                    torch.from_numpy(boxes), torch.from_numpy(scores), score_threshold, iou_threshold, limit, agnostic
                )
                np.testing.assert_array_equal(ours[0], ref[0].numpy(), err_msg=f"trial {trial}")
                np.testing.assert_array_equal(ours[1], ref[1].numpy())
                np.testing.assert_array_equal(ours[2], ref[2].numpy())


def test_nms_is_class_aware_and_respects_its_parameters() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    # Box 1 overlaps box 0 with IoU 9/11 = 0.82; box 2 is box 0 again but as another class.
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.6, 0.0]], np.float32)
    _, score, label = detection.select(boxes, scores, 0.5, 0.5, 100)
    assert score.tolist() == pytest.approx([0.9, 0.7, 0.6]) and label.tolist() == [0, 1, 0]
    assert len(detection.select(boxes, scores, 0.5, 0.85, 100)[0]) == 4  # IoU 0.82 is not above 0.85
    assert len(detection.select(boxes, scores, 0.5, 0.5, 2)[0]) == 2  # max_detections keeps the best
    assert detection.select(boxes, scores, 0.8, 0.9, 100)[1].tolist() == pytest.approx([0.9, 0.8])  # >= threshold
    assert len(detection.select(boxes, scores, 0.5, 0.5, 100, classes=[1])[0]) == 1
    # Agnostic: the class-1 duplicate of box 0 is suppressed; scores are summed over classes.
    assert detection.select(boxes, scores, 0.5, 0.5, 100, agnostic=True)[1].tolist() == pytest.approx([0.9, 0.6])
    empty = detection.select(np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32), 0.5, 0.5, 10)
    assert [len(part) for part in empty] == [0, 0, 0]
    # A 100x50 photo letterboxed on a 100x100 canvas (rows 25-75): a confident box in the padding
    # neither suppresses the real box it overlaps nor takes the only place.
    content = detection.Letterbox(1.0, 1.0, 0, 25, 100, 50)
    pair = np.array([[10, 0, 50, 25], [10, 5, 50, 35]], np.float32)  # in the top padding / reaching into the photo
    pair_scores = np.array([[0.9, 0], [0.7, 0]], np.float32)
    kept, score, _ = detection.select(pair, pair_scores, 0.5, 0.3, 1, content=content)
    assert kept.tolist() == [[10, 5, 50, 35]] and score.tolist() == pytest.approx([0.7])
    assert detection.select(pair, pair_scores, 0.5, 0.3, 1)[1].tolist() == pytest.approx([0.9])  # without it: the padding box
    # Nor does it take one of the pre-NMS places (a very wide photo's padding is most of the canvas): here 1 place,
    # which the padding box took, leaving the real one out. The reference the export's parity uses agrees.
    kept, score, _ = detection.select(pair, pair_scores, 0.5, 0.3, 5, pre_nms_top_k=1, content=content)
    assert kept.tolist() == [[10, 5, 50, 35]]
    ref = reference_select(torch.from_numpy(pair), torch.from_numpy(pair_scores), 0.5, 0.3, 5, pre_nms_top_k=1, content=content)
    assert ref[0].tolist() == [[10, 5, 50, 35]]


def test_http_thresholds_classes_and_limits(client: httpx.Client) -> None:
    data = crowded_photo().path.read_bytes()
    default = post(client, data).json()
    assert default["score_threshold"] == MANIFEST.defaults["score_threshold"]
    assert default["iou_threshold"] == MANIFEST.defaults["iou_threshold"]
    assert len(default["detections"]) >= 3
    scores = [d["score"] for d in default["detections"]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= default["score_threshold"]
    assert len(post(client, data, max_detections=1).json()["detections"]) == 1
    zero = post(client, data, iou_threshold="-0").json()  # echoed back: a client's -0 answers as 0
    assert math.copysign(1.0, zero["iou_threshold"]) == 1.0
    loose = post(client, data, iou_threshold=1.0).json()["detections"]
    strict = post(client, data, iou_threshold=0.05).json()["detections"]
    assert len(loose) >= len(default["detections"]) >= len(strict)
    assert post(client, data, score_threshold=1.0).json()["detections"] == []
    for wanted in (["with_mask"], ["with_mask", "without_mask"]):
        found = client.post(
            "/v1/detect",
            params={"model": DETECTOR, "classes": ",".join(wanted), "score_threshold": 0.05},
            content=data,
            headers={"content-type": "image/jpeg"},
        ).json()["detections"]
        assert found and {d["label"] for d in found} <= set(wanted)
    repeated = client.post(
        "/v1/detect",
        params=[("model", DETECTOR), ("classes", "with_mask"), ("classes", "without_mask"), ("score_threshold", 0.05)],
        files={"file": ("a.jpg", data, "image/jpeg")},
    )
    assert repeated.status_code == 200 and repeated.json()["detections"] == found  # both values taken, as a comma list
    assert {d["label"] for d in found} == {"with_mask", "without_mask"}  # the photo has both: the second value counts


def test_format_image_returns_the_photo_with_boxes(client: httpx.Client) -> None:
    sample = crowded_photo()
    response = post(client, sample.path.read_bytes(), format="image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert int(response.headers["x-detections"]) >= 3 and response.headers["x-model"] == DETECTOR
    drawn = Image.open(io.BytesIO(response.content))
    original = Image.open(sample.path).convert("RGB")
    assert drawn.size == original.size
    # Boxes were drawn: the picture differs from the photo, but only in places (outlines and labels).
    difference = np.abs(np.asarray(drawn, np.int16) - np.asarray(original, np.int16)).max(2) > 60
    assert 0.002 < difference.mean() < 0.3


def test_model_listing_describes_the_detector(client: httpx.Client) -> None:
    detail = client.get(f"/v1/models/{DETECTOR}").json()
    assert detail["task"] == "detection" and detail["labels"] == ["mask_weared_incorrect", "with_mask", "without_mask"]
    assert detail["input"]["resize"] == "letterbox" and detail["outputs"] == {"boxes": "boxes", "scores": "scores"}
    assert {"score_threshold", "iou_threshold", "max_detections"} <= set(detail["defaults"])
    assert detail["metrics"]["split"].startswith("facemask.json") and detail["training"]["seconds"] > 0
    assert (MODELS / DETECTOR / "model.onnx").stat().st_size < 10_000_000


# --- bad input -------------------------------------------------------------------------------

JPEG = TEST[0].path.read_bytes()
BAD = {
    "score below 0": ({"score_threshold": -0.1}, 422, "invalid_parameter"),
    "score above 1": ({"score_threshold": 1.5}, 422, "invalid_parameter"),
    "score not a number": ({"score_threshold": "high"}, 422, "invalid_parameter"),
    "score nan": ({"score_threshold": "nan"}, 422, "invalid_parameter"),
    "iou above 1": ({"iou_threshold": 2}, 422, "invalid_parameter"),
    "iou infinite": ({"iou_threshold": "inf"}, 422, "invalid_parameter"),
    "max_detections zero": ({"max_detections": 0}, 422, "invalid_parameter"),
    "max_detections huge": ({"max_detections": 100000}, 422, "invalid_parameter"),
    "unknown class": ({"classes": "with_mask,cat"}, 422, "invalid_parameter"),
    "empty class list": ({"classes": ","}, 422, "invalid_parameter"),
    "bad format": ({"format": "bmp"}, 422, "invalid_parameter"),
    "unknown model": ({"model": "nope"}, 404, "unknown_model"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_parameters_are_a_clear_4xx(client: httpx.Client, case: str) -> None:
    params, status, code = BAD[case]
    response = client.post("/v1/detect", params={"model": DETECTOR, **params}, files={"file": ("a.jpg", JPEG, "image/jpeg")})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


BAD_BODIES = {
    "empty": ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_image"),
    "truncated jpeg": ({"files": {"file": ("a.jpg", JPEG[: len(JPEG) // 2], "image/jpeg")}}, 400, "corrupt_image"),
    "damaged png pixels": ({"files": {"file": ("a.png", damaged_png(), "image/png")}}, 400, "corrupt_image"),
    "text file": ({"files": {"file": ("a.txt", b"not an image\n" * 20, "text/plain")}}, 415, "unsupported_image"),
    "json with another key": ({"json": {"image": "x"}}, 422, "unknown_parameter"),
    "text body": ({"content": b"boxes please", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "multipart without file": ({"files": {"other": ("a.jpg", JPEG, "image/jpeg")}}, 422, "missing_file"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_images_are_a_clear_4xx(client: httpx.Client, case: str) -> None:
    kwargs, status, code = BAD_BODIES[case]
    for fmt in ("json", "image"):
        response = client.post("/v1/detect", params={"format": fmt}, **kwargs)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    assert client.get("/healthz").status_code == 200


def test_a_classifier_is_not_a_detector(client: httpx.Client) -> None:
    classifiers = [m["name"] for m in client.get("/v1/models").json()["models"] if m.get("task") == "classification"]
    assert classifiers, "the reference classifier is expected in models/"
    response = client.post("/v1/detect", params={"model": classifiers[0]}, content=JPEG, headers={"content-type": "image/jpeg"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "wrong_task"


def test_detect_needs_a_read_key_when_keys_are_set() -> None:
    with start_server(api_keys="reader:read") as live, live.client() as http:
        assert http.post("/v1/detect", content=JPEG, headers={"content-type": "image/jpeg"}).status_code == 401
        allowed = http.post(
            "/v1/detect", params={"model": DETECTOR}, content=JPEG, headers={"content-type": "image/jpeg", "x-api-key": "reader"}
        )
        assert allowed.status_code == 200 and allowed.json()["model"] == DETECTOR


def test_outputs_are_read_by_their_manifest_role_not_by_position(tmp_path: Path, client: httpx.Client) -> None:
    """A manifest listing ``scores`` before ``boxes`` (as ``service.add_model --output`` may write it) gives
    the same detections, on /v1/detect and in the face pipeline."""
    for name in (DETECTOR, "face-detector"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").symlink_to(MODELS / name / "model.onnx")
        manifest = json.loads((MODELS / name / "model.json").read_text())
        manifest["outputs"] = dict(reversed(manifest["outputs"].items()))
        (folder / "model.json").write_text(json.dumps(manifest))
    (tmp_path / "lfw-face").symlink_to(MODELS / "lfw-face")
    photo = TEST[0].path.read_bytes()
    face = (DATASETS / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg").read_bytes()
    with start_server(models_dir=tmp_path) as live, live.client() as reordered:
        for name in (DETECTOR, "face-detector"):
            params = {"model": name, "score_threshold": 0.2}
            ours = reordered.post("/v1/detect", params=params, content=photo, headers={"content-type": "image/jpeg"})
            reference = client.post("/v1/detect", params=params, content=photo, headers={"content-type": "image/jpeg"})
            assert ours.status_code == 200 and ours.json()["detections"], ours.text
            assert ours.json()["detections"] == reference.json()["detections"]
        embedded = reordered.post("/v1/faces/embed", files={"file": face}).json()
        assert embedded["faces_found"] == 1 and embedded["faces"][0]["score"] > 0.5, embedded


def test_the_graph_sees_the_same_pixels_whatever_is_returned() -> None:
    """format=image (detect) and format=overlay (segment) return the photo, and decoded it in full for the
    graph too, so one upload could get other boxes or masks than with format=json (code review)."""
    from service.api.detect import Prepared as DetectPrepared
    from service.api.segment import Prepared as SegmentPrepared
    from service.settings import Settings

    photo = Image.open(TEST[0].path).convert("RGB")
    large = io.BytesIO()
    photo.resize((photo.width * 8, photo.height * 8)).save(large, "JPEG", quality=90)  # the JPEG draft applies
    data, settings = large.getvalue(), Settings(_env_file=None)
    segmenter = Manifest.read(MODELS / "pennfudan-unet")
    for prepare, manifest in ((DetectPrepared, MANIFEST), (SegmentPrepared, segmenter)):
        returned, answered = prepare(data, settings, manifest, True), prepare(data, settings, manifest, False)
        assert np.array_equal(returned.inputs, answered.inputs), manifest.name
        assert returned.photo is not None and returned.photo.size == returned.span.size == answered.span.size == (
            photo.width * 8,
            photo.height * 8,
        )
